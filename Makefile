# orderbus: `make run` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test check unit integration jars venv schemas clean system-tools bench bench-quick chaos lock

run: $(INSTALLED) jars  ## local Kafka, sandbox systems, the daemon and an order generator, with a live view
	$(BIN)/orderbus demo

test: check jars system-tools  ## every check and every test (unit + integration against a real broker)
	$(BIN)/pytest

check: $(INSTALLED)  ## formatting, lint and types
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m topics.schema --check
	$(BIN)/python -m daemon.openapi --check

bench: $(INSTALLED) jars  ## benchmark, not part of make test (~16 min): one table + bench-results.json
	$(BIN)/pip install --quiet 'py-spy>=0.3'
	$(BIN)/python tests/bench/bench.py --out bench-results.json

bench-quick: $(INSTALLED) jars  ## the benchmark with a 1-minute outage (~4 min)
	$(BIN)/pip install --quiet 'py-spy>=0.3'
	$(BIN)/python tests/bench/bench.py --quick --out bench-results.json

chaos: $(INSTALLED) jars  ## kills, broker restarts and faults over 100,000 orders (<= 30 min): chaos.json
	$(BIN)/python tests/chaos/chaos.py --out chaos.json

unit: $(INSTALLED)
	$(BIN)/pytest tests/unit

integration: $(INSTALLED) jars system-tools
	$(BIN)/pytest tests/integration

schemas: $(INSTALLED)  ## regenerate the JSON Schemas and the OpenAPI document after a model change
	$(BIN)/python -m topics.schema
	$(BIN)/python -m daemon.openapi

jars: $(INSTALLED)  ## resolve the Apache Kafka jars with Maven into ~/.cache/orderbus (once)
	$(BIN)/orderbus kafka fetch >/dev/null

venv: $(INSTALLED)

# promtool and prometheus (Debian's prometheus) for the rule tests and a real scrape; systemd-analyze for the unit;
# openssl makes the certificates of the HTTPS listener's tests.
SYSTEM_TOOLS := promtool:prometheus prometheus:prometheus systemd-analyze:systemd openssl:openssl
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  { $$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; }; \
	fi

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[dev]'
	touch $@

lock:  ## every dependency at the newest version pyproject.toml allows, into constraints.txt (then: make test)
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet '.[dev]'
	{ grep '^#' constraints.txt; .lock-venv/bin/pip freeze | grep -v '^orderbus'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv .run .mypy_cache .ruff_cache .pytest_cache *.egg-info
