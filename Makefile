# The two README commands: `make demo` (set up, fetch the real model and data, run the main job)
# and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
CLI := $(VENV)/bin/secptune

.PHONY: setup prepare demo test test-fast bazel-install bazel-test clean-venv

setup:
	@bash scripts/setup_env.sh

prepare: setup
	$(CLI) prepare

# The main job: a real privacy-preserving tuning run on SmolLM2-135M under SPU (3-party ABY3 with
# PUMA-style approximations, in the simulator). Every accuracy it reports is computed through SPU.
# Kept to ~10 minutes on 2 cores: 1 example per class for training and 1 for dev, 4 test examples,
# texts cut to 6 words, 3 prompt tokens, population 2, 2 generations. It prints what the full budget would cost.
DEMO_ARGS ?= --task mr --model smollm2-135m --policy aby3-puma --backend sim --shots 1 --n-test 4 \
	--max-words 6 --popsize 2 --budget 2 --n-tokens 3
demo: prepare
	$(CLI) generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 4
	rm -rf runs/demo
	$(CLI) tune $(DEMO_ARGS) --out runs/demo

# Prepares the real assets first (idempotent, fast when cached) so the slow real-model tests run.
test: prepare
	bash scripts/run_tests.sh

test-fast: setup
	bash scripts/run_tests.sh -m "not slow"

# The fast suite under Bazel (README, "Bazel"): offline, in Bazel's sandbox, with the .venv's
# interpreter (so it sets up .venv first). Bazel 4.2 is Debian's bazel-bootstrap, installed here
# if missing (as root). Flags sized for 2 cores.
BAZEL_FLAGS ?= --jobs=2 --local_test_jobs=2
bazel-test: setup bazel-install
	bazel test //tests:fast $(BAZEL_FLAGS)

bazel-install:
	@if ! command -v bazel >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "bazel-test: Bazel is missing; install it with: sudo apt-get install -y bazel-bootstrap" >&2; exit 2; fi; \
	  echo "bazel-test: installing Bazel 4.2 (Debian's bazel-bootstrap) ..."; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q bazel-bootstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bazel-bootstrap >/dev/null; }; \
	fi
	@echo "bazel-test: bazel-bootstrap $$(dpkg-query -W -f='$${Version}' bazel-bootstrap 2>/dev/null || echo '(not from Debian)')"

clean-venv:
	rm -rf $(VENV)
