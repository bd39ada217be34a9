"""Fixtures only: a real stack on loopback (Redis, sidecar, Envoy, upstream) per session,
the admin stack, clients. Shared helpers are in tests/support."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support import stacks
from tests.support.routes import ENVOY_ROUTES, ROUTES
from tests.support.settlement import remember_gateway


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
