VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONFIG ?= config.example.toml

.PHONY: run test lint typecheck install clean bench

# The venv is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/live-bridge serve --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check bridge tests bench
	$(VENV)/bin/ruff format --check bridge tests bench

typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q -n auto

# Benchmarks (a few minutes): wrk from Debian's packages, psutil; writes docs/benchmarks.md.
bench: install
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
