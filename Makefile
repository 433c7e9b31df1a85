# Two-command bootstrap:  `make venv` (or just `make test` / `make run`, which build it first).
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# Interpreter that creates the venv: python3.11 if on PATH, else python3 (must be 3.11).
PYTHON     ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
PYTEST_ARGS ?=

# Lock tooling lives in its own venv so it never leaks into the project venv.
LOCK_VENV  := .venv-lock
PIP_TOOLS  := pip-tools==7.6.2
LOCK_ARGS  ?=
# Resolve against PyPI only: ignore machine-wide pip config/env (extra indexes, find-links).
LOCK_ENV   := env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX \
              PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock"
COMPILE    := $(LOCK_VENV)/bin/pip-compile --strip-extras --allow-unsafe \
              --no-emit-index-url --no-emit-find-links
LOCK_NOTE  := \# Pinned for CPython 3.11 on linux x86_64, resolved against PyPI only.\n\# Tool: pip-compile (pip-tools). Regenerate: `make lock` (LOCK_ARGS=--upgrade to bump).\n\# Command (PIP_* index/find-links env unset): PIP_CONFIG_FILE=/dev/null pip-compile --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links

.PHONY: venv run test lock lint clean check-python

check-python:
	@test -n "$(PYTHON)" || { echo "error: neither python3.11 nor python3 found on PATH; install Python 3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' is not Python 3.11 ($$($(PYTHON) -V 2>&1)); this project needs 3.11." >&2; \
	  echo "       Install python3.11 or run: make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }

venv: $(STAMP)

# Reinstalls whenever a lock file or pyproject.toml changes.
$(STAMP): requirements.lock requirements-dev.lock pyproject.toml | check-python
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
	  echo "$(VENV) is not Python 3.11; recreating"; rm -rf $(VENV); fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.lock
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@touch $@

run: $(STAMP)
	exec $(PY) -m backend.server

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard backend scripts tests)

lock: | check-python
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_ENV) $(LOCK_VENV)/bin/pip install -q "$(PIP_TOOLS)"; }
	$(LOCK_ENV) $(COMPILE) $(LOCK_ARGS) -o requirements.lock requirements.in
	$(LOCK_ENV) $(COMPILE) $(LOCK_ARGS) -o requirements-dev.lock requirements-dev.in
	@for f in requirements.lock requirements-dev.lock; do \
	  { printf '$(LOCK_NOTE)\n'; cat $$f; } > $$f.tmp && mv $$f.tmp $$f; done

clean:
	rm -rf $(VENV) $(LOCK_VENV) build dist .pytest_cache .ruff_cache .hypothesis
	rm -rf *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +
