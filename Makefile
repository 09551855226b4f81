# dicombridge: the commands a newcomer and CI need. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := rabbitmq-server dcmtk orthanc

.PHONY: help deps venv lint typecheck test test-unit faults demo bench clean

help:
	@echo "make demo   set up what is missing and show a DICOM file crossing the bridge"
	@echo "make test   lint, type-check and run every test (real RabbitMQ, DCMTK, Orthanc)"

# Debian packages the tests and the demo run for real (needs root or sudo).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(BIN)/dicombridge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/dicombridge

lint: venv
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

typecheck: venv
	$(BIN)/mypy

test: deps venv lint typecheck
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest -m "not integration"

# The fault-injection suite alone (make test runs it too): a 200-instance study through
# crashes and outages; its figures are printed and written to bench-results/faults.json.
faults: deps venv
	$(BIN)/pytest tests/faults -m faults

demo: deps venv
	$(BIN)/python -m dicombridge.demo

# Figures, never asserted in tests: printed and written to bench-results/. The WAN
# benchmark makes network namespaces and needs root.
bench: deps venv
	$(BIN)/python bench/transfer_core.py
	$(BIN)/python bench/relay_compare.py
	$(BIN)/python bench/wan.py
	$(BIN)/python bench/query_retrieve.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
