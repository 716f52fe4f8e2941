# Shortcuts for the common development loops; `make help` lists them. Each target runs
# the command CONTRIBUTING.md documents, with the project's venv when there is one.

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python)
PRESET ?= tiny

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-gpu lint format bench docs docs-serve quickstart clean

help:  ## list the targets
	@echo "make targets (PYTHON=$(PYTHON)):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 14

install:  ## the README's two pip installs (plus the docs extra) into PYTHON's environment
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev,docs]'

test:  ## fast tests (pytest's default: not slow, not gpu)
	$(PYTHON) -m pytest

test-all:  ## fast and slow tests, as CI runs them
	$(PYTHON) -m pytest -m "not gpu"

test-gpu:  ## tests marked gpu (on a machine with CUDA)
	$(PYTHON) -m pytest -m gpu

lint:  ## ruff check
	$(PYTHON) -m ruff check src tests benchmarks

format:  ## ruff format
	$(PYTHON) -m ruff format src tests benchmarks

bench:  ## training tokens/s, step time, MFU and peak memory of PRESET (default tiny), as JSON
	$(PYTHON) -m lmlab bench --preset $(PRESET) --steps 10

docs:  ## build the documentation site into site/ (warnings are errors)
	$(PYTHON) -m mkdocs build --strict

docs-serve:  ## serve the documentation site at http://127.0.0.1:8000, rebuilt on change
	$(PYTHON) -m mkdocs serve

quickstart:  ## lmlab quickstart into ./quickstart (a few minutes on a laptop CPU)
	$(PYTHON) -m lmlab quickstart --out quickstart

clean:  ## remove build outputs, the docs site, caches and .ci-venv (never runs/ or data)
	rm -rf build dist site .ci-venv .pytest_cache .ruff_cache src/*.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
