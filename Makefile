# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install lock test-latest demo science test test-fast bench dag flow clean gpu-smoke gpu-wheels gpu-wheel-parts gpu-smoke-offline

# What `make install` puts in the venv, exactly (versions and hashes): requirements/lock.txt,
# made by `make lock` from pyproject.toml's ranges. The stamp reinstalls when the lock changes.
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed-lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(LOCK) pyproject.toml
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	cp $(LOCK) $@

install: $(STAMP)

# Regenerate the locks after changing pyproject.toml's dependencies (keeps current pins where
# they still fit); `make lock UPGRADE=1` takes the newest releases. Then `make test`.
lock: install
	$(BIN)/python requirements/lock.py $(if $(UPGRADE),--upgrade)

# The newest releases pyproject.toml allows, in a venv of their own, through the fast tests:
# drift shows up here as a report, not as a red CI. Prints what differs from the lock first.
LATEST ?= .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q -e '.[dev,docker]'
	$(LATEST)/bin/pip install -q --no-deps -r requirements/no-deps.in
	$(LATEST)/bin/python -m tasks.core.stack --against $(LOCK) || true
	SELFDISTILL_OFF_LOCK=1 PATH=$(abspath $(LATEST))/bin:$$PATH $(LATEST)/bin/python -m pytest -m "not slow"

demo: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "selfdistill")
	$(BIN)/selfdistill validate
	PATH=$(BIN):$$PATH $(BIN)/dvc repro
	@cat report/summary.md

# The science profile (docs/results/science.md): ~2 h on 2 cores; leaves params.yaml changed.
science: install
	@git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git commit -qm "selfdistill")
	$(BIN)/selfdistill profile science
	PATH=$(BIN):$$PATH $(BIN)/dvc repro
	@cat report/summary.md

# The tests on TEST_WORKERS pytest-xdist workers, a test file per worker at a time (a file's
# fixtures are built once); the suite leaves a core idle half the time when run serially
# (subprocesses, servers, image builds). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := PATH=$(BIN):$$PATH $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	PATH=$(BIN):$$PATH $(BIN)/python bench/bench_sandbox.py --rounds 3
	PATH=$(BIN):$$PATH $(BIN)/python -m bench.bench_sampling --model models/base --prompts 32 --rounds 2

# On a GPU machine: `dvc repro` of the gpu-smoke profile in a scratch workspace, vLLM where it
# imports, each stage timed and its peak memory beside the plan's (bench/gpu_smoke.py);
# `make gpu-smoke GPU_SMOKE_ARGS="--allow-cpu --profile profiles/tiny.yaml"` runs it on a CPU.
# Where the machine has only torch and transformers and no package index, bring the rest as
# wheels: `make gpu-wheels gpu-wheel-parts` here (.whl/, then .whl-parts/: parts of at most 64 MiB),
# carry the checkout and each part over, then `make gpu-smoke-offline` there.
GPU_SMOKE_ARGS ?=
gpu-smoke: install
	$(BIN)/python bench/gpu_smoke.py $(GPU_SMOKE_ARGS)

# The GPU machine's Python, torch and transformers (what is installed there).
GPU_PYTHON_VERSION ?= 3.12
GPU_TORCH ?= 2.11.0
GPU_TRANSFORMERS ?= 5.17.0
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py --python-version $(GPU_PYTHON_VERSION) --torch $(GPU_TORCH) \
	  --transformers $(GPU_TRANSFORMERS) -o .whl

# The wheels in parts of at most 60 MiB with their sha256 (bench/wheel_parts.py), each small
# enough to carry on its own; gpu-smoke-offline joins and checks them where .whl/ is missing.
gpu-wheel-parts:
	$(PYTHON) bench/wheel_parts.py split .whl -o .whl-parts

gpu-smoke-offline:
	test -d .whl || python3 bench/wheel_parts.py join .whl-parts -o .whl
	python3 -m pip install -q --no-index --no-deps --target /tmp/selfdistill-site .whl/*.whl
	PATH=/tmp/selfdistill-site/bin:$$PATH PYTHONPATH=/tmp/selfdistill-site python3 bench/gpu_smoke.py $(GPU_SMOKE_ARGS)

flow: install
	PATH=$(BIN):$$PATH $(BIN)/selfdistill flow run

dag: install
	$(BIN)/dvc dag

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache
