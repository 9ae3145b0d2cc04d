# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-cluster test lint typecheck check bench clean system-deps

# Debian packages the tests use, as PACKAGE:PROGRAM (see scripts/ensure-debian-packages):
# bubblewrap and setpriv build the process sandboxes' walls (docs/sandboxing.md);
# chromium is the headless browser the web console's tests drive (tests/console).
DEBIAN_PACKAGES := bubblewrap:bwrap util-linux:setpriv chromium:chromium

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found %s); set PYTHON=python3.11" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.demo
	$(BIN)/python -m examples.cluster_demo

# Three nodes on one etcd, and a session that moves when its node is killed (~10 s).
demo-cluster: $(STAMP)
	$(BIN)/python -m examples.cluster_demo

system-deps:
	@scripts/ensure-debian-packages $(DEBIAN_PACKAGES)

# The suite runs in 4 processes (pytest-xdist): most tests wait on real servers and
# subprocesses, so 4 keep 2 cores busy. PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= 4

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy does not follow setuptools' editable import hook, so it checks the
# folders through a small tree of symlinks that spells the installed layout.
typecheck: $(STAMP)
	@mkdir -p build/typecheck/ppio_sandbox
	@for p in agent_runtime orchestrator client; do ln -sfn ../../../$$p build/typecheck/ppio_sandbox/$$p; done
	MYPYPATH=build/typecheck $(BIN)/mypy -p ppio_sandbox.agent_runtime -p ppio_sandbox.orchestrator -p ppio_sandbox.client

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python -m benchmarks run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache *.egg-info
