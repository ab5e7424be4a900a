PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test workers: one per core. `make test PYTEST_WORKERS=0` runs in this process (for pdb).
PYTEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS)

.PHONY: test test-fast lint bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The static checks, then everything, the slow tests (real processes, the CLI, servers) included.
test: lint
	$(PYTEST)

# The unit tests alone: nothing marked slow, no subprocess (tests/conftest.py fails any that starts one).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# ruff (rules in pyproject.toml) and strict mypy over the shipped code.
lint: $(STAMP)
	$(PY) -m ruff check overlay packer
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run.py

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache bench/results
