# Two-command bootstrap:  `make venv` (or just `make test` / `make run`, which build it first).
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
# Interpreter that creates the venv: python3.11 if on PATH, else python3 (must be 3.11).
PYTHON     ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
PYTEST_ARGS ?=

# Label Studio for the end-to-end tests (tests/e2e) lives in its own venv, never in $(VENV).
LS_VENV    := .venv-ls
LS_STAMP   := $(LS_VENV)/.installed

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

.PHONY: venv venv-ls system-deps run test lock lint clean check-python

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

venv-ls: $(LS_STAMP)

# Reinstalls whenever requirements-ls.lock changes. The first e2e run also migrates a Label
# Studio template database under .cache/ (~30 s, once per Label Studio version).
$(LS_STAMP): requirements-ls.lock | check-python
	@if [ -x $(LS_VENV)/bin/python ] && ! $(LS_VENV)/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
	  echo "$(LS_VENV) is not Python 3.11; recreating"; rm -rf $(LS_VENV); fi
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q -r requirements-ls.lock
	@touch $@

# Debian packages the tests need (chromium, fonts-liberation, redis-server); see the script.
system-deps:
	@scripts/system_test_deps.sh

run: $(STAMP)
	exec $(PY) -m backend.server

test: $(STAMP) $(LS_STAMP) system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard backend scripts tests)

lock: | check-python
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
	  $(LOCK_ENV) $(LOCK_VENV)/bin/pip install -q "$(PIP_TOOLS)"; }
	$(LOCK_ENV) $(COMPILE) $(LOCK_ARGS) -o requirements.lock requirements.in
	$(LOCK_ENV) $(COMPILE) $(LOCK_ARGS) -o requirements-dev.lock requirements-dev.in
	$(LOCK_ENV) $(COMPILE) $(LOCK_ARGS) -o requirements-ls.lock requirements-ls.in
	@for f in requirements.lock requirements-dev.lock requirements-ls.lock; do \
	  { printf '$(LOCK_NOTE)\n'; cat $$f; } > $$f.tmp && mv $$f.tmp $$f; done

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LS_VENV) .cache/label-studio-template-* build dist .pytest_cache .ruff_cache .hypothesis
	rm -rf *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +
