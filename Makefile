# `make demo` and `make test` each create or refresh .venv (CPU torch on CPU-only machines,
# CUDA torch where an NVIDIA GPU is present), install what they need, and run.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export RAY_AUTH_MODE ?= disabled

.PHONY: venv demo test test-fast lint bench clean

venv:
	@bash scripts/setup-venv.sh data,ray,flows,dev

# The full DAG on the embedded default: a local Prefect server with its UI on 127.0.0.1:4200
# (started or reused), a local Ray, artifacts under ./artifacts/run.
demo: venv
	$(PY) -m pipeline.cli run --server local --require-gates $(DEMO_ARGS)

test: venv
	@bash scripts/setup-browser.sh
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts
