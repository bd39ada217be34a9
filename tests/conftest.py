"""Fixtures: a real stack on loopback (Redis, sidecar, Envoy, upstream) per session, the
admin stack, clients; and each xdist worker's ports. Shared helpers are in tests/support."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from sidecar.ledger.accounts import Ledger
from sidecar.tools import ports
from sidecar.tools.stack import Stack
from tests.support import stacks
from tests.support.routes import ENVOY_ROUTES, ROUTES
from tests.support.settlement import remember_gateway

if TYPE_CHECKING:  # web3 and x402 load only in the modules that use the chain
    from sidecar.tools.chain import AnvilChain
    from sidecar.tools.onchain import FacilitatorProcess


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`'s -n 2) each worker, and every process it starts,
    takes ports from its own share (sidecar/tools/ports.py): two workers never race for one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):
        count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        os.environ[ports.RANGE_ENV] = ports.shard_range(int(worker[2:]), count)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("x402")
    group.addoption(
        "--conservation-ops",
        default=3000,
        type=int,
        help="operations in the conservation-of-money workload",
    )
    group.addoption("--conservation-seed", default=402, type=int)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES) as running:
        yield running


@pytest.fixture(scope="session")
async def ledger(stack: Stack) -> AsyncIterator[Ledger]:
    client = Ledger.from_url(stack.redis_url)
    yield client
    await client.close()


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        yield http


@pytest.fixture(scope="session")
def admin_stack() -> Iterator[Stack]:
    """Two sidecar workers and the admin API with a token (stacks.ADMIN_TOKEN)."""
    with stacks.admin_stack() as running:
        remember_gateway(running)
        yield running


# -- the chain parts of the `exact` tests: one anvil and one facilitator per module --------


@pytest.fixture(scope="module")
def chain() -> Iterator[AnvilChain]:
    """anvil with Circle's USDC deployed, the payers of sidecar.tools.onchain funded."""
    from sidecar.tools.chain import AnvilChain
    from sidecar.tools.onchain import payers

    with AnvilChain() as running:
        for payer in payers(running):
            running.mint(payer.address, 100_000_000)  # 100 USDC each
        yield running


@pytest.fixture(scope="module")
def facilitator(
    chain: AnvilChain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FacilitatorProcess]:
    """`x402 facilitator serve` on the module's chain."""
    from sidecar.tools.onchain import FacilitatorProcess

    served = FacilitatorProcess(chain, tmp_path_factory.mktemp("facilitator")).start()
    yield served
    served.stop()
