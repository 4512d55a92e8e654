# keel: two commands for a new user.
#   make demo   set up and run a guarded agent on the embedded default (SQLite under .keel/)
#   make test   set up and run the whole suite: lint, types, tests (Postgres too), notebooks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.keel-installed

.PHONY: demo test setup lint types pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

# Strict editable installs link the files that exist at install time; re-link so new modules import.
setup: $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=strict > $(VENV)/relink.log 2>&1 || { cat $(VENV)/relink.log; exit 1; }

demo: setup
	$(VENV)/bin/keel demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: setup
	$(VENV)/bin/mypy

pytest: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: lint types pytest

bench: setup
	$(PY) bench/agent_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .keel .mypy_cache .ruff_cache .pytest_cache
