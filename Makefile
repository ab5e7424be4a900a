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

# Everything, the slow tests (real processes, the CLI, fresh interpreters) included.
test: $(STAMP)
	$(PYTEST)

# The unit tests alone: nothing marked slow, no subprocess (tests/conftest.py fails any that starts one).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# Static checks (mypy, ruff) go here. Not a prerequisite of `test` until they pass and are wired in.
lint: $(STAMP)
	@echo "lint: no checks wired in yet"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/run.py

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/results
