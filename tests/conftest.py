"""Shared fixtures: a real stack on loopback (Redis, sidecar, Envoy, upstream) per session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("x402")
    group.addoption(
        "--conservation-ops",
        default=3000,
        type=int,
        help="operations in the conservation-of-money workload",
    )
    group.addoption("--conservation-seed", default=402, type=int)


# Priced both in the sidecar config and as Envoy annotations, like a chart install.
ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {
        "method": "GET",
        "path": "/api/v1/agent/pay-api/atlas",
        "price": "0.25",
        "description": "Atlas agent API",
    },
    "verify": {"method": "GET", "path": "/api/v1/trade/verify/{trade_id}", "price": "0.01"},
    # In the sidecar's route table only: Envoy sends it down the unannotated fallback route.
    "signal": {"method": "GET", "path": "/api/v1/market/signal", "price": "0.0005"},
}
ENVOY_ROUTES: dict[str, dict[str, Any]] = {
    "atlas": ROUTES["atlas"],
    "verify": ROUTES["verify"],
    # Priced by its Envoy annotation alone.
    "annotated": {"method": "POST", "path": "/api/v1/annotated", "price": "0.02"},
}


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


async def funded_payer(ledger: Ledger, amount: int, asset: str = "USDF") -> Identity:
    """A fresh registered agent wallet holding `amount` atomic units."""
    wallet = Identity.generate()
    await ledger.register(wallet.public_key)
    if amount:
        await ledger.credit(wallet.public_key, asset, amount, f"setup-{wallet.public_key}")
    return wallet


def pay_invoice(challenge: httpx.Response, wallet: Identity, **tamper: Any) -> dict[str, str]:
    """Sign the invoice of a 402 (optionally with fields changed first) → request headers."""
    terms = {**challenge.json()["x402"], **tamper}
    return {"X-Payment": protocol.encode_header(protocol.sign_proof(terms, wallet))}


def direct_terms(
    stack: Stack, resource: str, amount: str, ttl: int = 60, **fields: Any
) -> dict[str, Any]:
    """Terms of a direct (no challenge) payment."""
    return {
        "version": protocol.VERSION,
        "scheme": protocol.SCHEME,
        "nonce": protocol.new_nonce(),
        "resource": resource,
        "asset": "USDF",
        "amount": amount,
        "payee": stack.gateway_identity.kid,
        "expires_at": int(time.time()) + ttl,
        **fields,
    }


def pay_direct(
    stack: Stack, wallet: Identity, resource: str, amount: str, **fields: Any
) -> dict[str, str]:
    proof = protocol.sign_proof(direct_terms(stack, resource, amount, **fields), wallet)
    return {"X-Payment": protocol.encode_header(proof)}
