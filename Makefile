# Set-up and entry points. Both targets create or reuse .venv.
#
# torch is installed before the project on purpose: with no torch present, pip
# resolves the project's plain "torch>=2.1" to a multi-GB CUDA build. On a GPU
# host, pre-install your CUDA torch into .venv (or set TORCH_REQUIREMENT) first.

PYTHON ?= python3
VENV ?= .venv
TORCH_REQUIREMENT ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunefleet-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint bench venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_REQUIREMENT)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/tunefleet demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ansible-lint playbooks/

include bench/Makefile.inc
