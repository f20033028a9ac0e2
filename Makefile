# The two README commands: `make demo` (set up, fetch the real model and data, run the main job)
# and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
CLI := $(VENV)/bin/secptune

.PHONY: setup prepare demo test test-all test-fast bazel-install bazel-test clean-venv

setup:
	@bash scripts/setup_env.sh

prepare: setup
	$(CLI) prepare

# The main job, in two runs of the same configuration (late-layer virtual prompt in the top 4 of
# SmolLM2's 30 layers, SiLU as relu_poly under ABY3, 16-example mini-batches, dev scored for the
# search mean only):
# 1. privately, through SPU (3-party ABY3 in the simulator): every accuracy it prints is computed
#    through SPU, and it prints the MPC cost and what the full 16-shot job would cost here. Each
#    example costs a one-off secure prefill of the whole model (~1-2 min on 2 cores), so this run
#    is small: 1 + 1 examples per class, 2 test examples, texts cut to 8 words, 2 generations of 4.
# 2. the full 16-shot job on the plaintext back end (the same programs, in plaintext), on BBC's
#    five topics, with the head fitted over the opened word logits: tuned against zero-shot and
#    against the head fitted at P0 (one secure forward, no search) on all 426 test examples, with
#    Wilson intervals and McNemar's test for both.
DEMO_SPU_ARGS ?= --task mr --model smollm2-135m --policy aby3-fast --backend sim --prompt-form virtual \
	--prompt-depth 4 --init "text: Is this review positive or negative?" --train-batch 16 --dev-eval mean --shots 1 --n-test 2 \
	--max-words 8 --popsize 4 --budget 2
DEMO_FULL_ARGS ?= --task bbc --model smollm2-135m --policy aby3-fast --backend plaintext --prompt-form virtual \
	--prompt-depth 4 --init "text: What is the topic of this article?" --train-batch 40 --dev-eval mean \
	--head fit --shots 16 --n-test 1000 --popsize 20 --budget 25
demo: prepare
	$(CLI) generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 4
	rm -rf runs/demo runs/demo_full
	@echo "== 1/2: the private job through SPU (ABY3 simulator)"
	$(CLI) tune $(DEMO_SPU_ARGS) --out runs/demo
	@echo "== the private run applied to three new reviews (same back end and policy; the labels go to the data owner only)"
	$(CLI) predict --run runs/demo --input examples/data/new_reviews.txt
	@echo "== 2/2: a full 16-shot job (BBC topics, same placement, fitted head), plaintext back end"
	$(CLI) tune $(DEMO_FULL_ARGS) --out runs/demo_full

# Prepares the real assets first (idempotent, fast when cached) so the slow real-model tests run.
# `make test` (CI) leaves out the soak variants (longer repeats of behaviour it covers); test-all runs them.
test: prepare
	bash scripts/run_tests.sh -m "not soak"

test-all: prepare
	bash scripts/run_tests.sh

test-fast: setup
	bash scripts/run_tests.sh -m "not slow and not soak"

# The fast suite under Bazel (docs/development.md, "Bazel"): offline, in Bazel's sandbox, with the .venv's
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
