# orderbus: `make run` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test check unit integration jars venv schemas clean

run: $(INSTALLED) jars  ## local Kafka, topics and the daemon on embedded defaults
	$(BIN)/orderbus demo

test: check jars  ## every check and every test (unit + integration against a real broker)
	$(BIN)/pytest

check: $(INSTALLED)  ## formatting, lint and types
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m topics.schema --check
	$(BIN)/python -m daemon.openapi --check

unit: $(INSTALLED)
	$(BIN)/pytest tests/unit

integration: $(INSTALLED) jars
	$(BIN)/pytest tests/integration

schemas: $(INSTALLED)  ## regenerate the JSON Schemas and the OpenAPI document after a model change
	$(BIN)/python -m topics.schema
	$(BIN)/python -m daemon.openapi

jars: $(INSTALLED)  ## resolve the Apache Kafka jars with Maven into ~/.cache/orderbus (once)
	$(BIN)/orderbus kafka fetch >/dev/null

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache *.egg-info
