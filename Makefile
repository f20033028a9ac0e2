# The two README commands: `make demo` (set up, fetch the real model and data, run the main job)
# and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
CLI := $(VENV)/bin/secptune

.PHONY: setup prepare demo test test-fast clean-venv

setup:
	@bash scripts/setup_env.sh

prepare: setup
	$(CLI) prepare

demo: prepare
	$(CLI) generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 8

# Prepares the real assets first (idempotent, fast when cached) so the slow real-model tests run.
test: prepare
	bash scripts/run_tests.sh

test-fast: setup
	bash scripts/run_tests.sh -m "not slow"

clean-venv:
	rm -rf $(VENV)
