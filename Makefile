# igw — the two commands that matter: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help demo test lint typecheck layers check bench clean

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
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

layers: $(STAMP)
	$(BIN)/lint-imports

bench: $(STAMP)  ## gateway overhead: EPP requests/s and added latency over Envoy alone
	$(BIN)/igw bench overhead

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
