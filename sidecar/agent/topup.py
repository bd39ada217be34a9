"""Buy prepaid credit at a gateway: pay its top-up route with `exact` from the EVM key.

    wallet = Wallet.from_env(budget="20")      # an Ed25519 key and an EVM key
    done = topup("https://api.example", wallet, "5")
    done.balance, done.transaction             # the key's new balance, the on-chain transfer

The gateway names its top-up route in discovery (`topup`: method, path, asset, min, max);
the credit goes to the wallet's Ed25519 key (created by its first credit, no registration)
and the receipt is checked against the gateway's keys. `X402Auth(auto_topup=...)` runs the
same flow when a prepaid payment meets `unknown_payer` or `insufficient_funds`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import httpx

from sidecar.agent.discovery import Discovery, origin_of
from sidecar.agent.exact import TopUp
from sidecar.agent.flows import Wait, topup_flow, wait_async
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.errors import InvalidReceipt, ReceiptWarning, TopUpFailed, X402Error

__all__ = ["TopUp", "atopup", "topup"]


def topup(
    gateway: str,
    wallet: Wallet,
    amount: str,
    *,
    client: httpx.Client | None = None,
    gateway_keys: Mapping[str, str] | None = None,
    strict: bool = False,
    request_timeout: float = 120.0,
) -> TopUp:
    """Credit `amount` (a decimal string in the top-up asset) to the wallet's Ed25519 key.

    Raises TopUpFailed (the gateway's reason), a GuardRefused (nothing signed), or
    InvalidReceipt with strict=True; `gateway` is any URL of the gateway (its origin is
    used); `request_timeout`: seconds per HTTP request of a client made here."""
    origin = _origin(gateway)
    with ExitStack() as stack:
        http = client or stack.enter_context(httpx.Client(timeout=request_timeout))
        found = http.get(origin + protocol.DISCOVERY_PATH, auth=None)
        discovery = _discovery(found)
        flow = topup_flow(wallet, origin, amount, discovery, gateway_keys or discovery.keys)
        try:
            step = next(flow)
            while True:
                if isinstance(step, Wait):  # Retry-After of a 503 (settlement_pending, …)
                    step.event.wait(step.timeout)
                    step = flow.send(None)
                else:
                    step = flow.send(http.send(step, auth=None))
        except StopIteration as finished:
            done: TopUp = finished.value
        finally:
            flow.close()
    return _checked(done, strict)


async def atopup(
    gateway: str,
    wallet: Wallet,
    amount: str,
    *,
    client: httpx.AsyncClient | None = None,
    gateway_keys: Mapping[str, str] | None = None,
    strict: bool = False,
    request_timeout: float = 120.0,
) -> TopUp:
    """`topup` for asyncio (or trio) callers."""
    origin = _origin(gateway)
    async with AsyncExitStack() as stack:
        http = client
        if http is None:
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=request_timeout))
        found = await http.get(origin + protocol.DISCOVERY_PATH, auth=None)
        discovery = _discovery(found)
        flow = topup_flow(wallet, origin, amount, discovery, gateway_keys or discovery.keys)
        try:
            step = next(flow)
            while True:
                if isinstance(step, Wait):
                    await wait_async(step)
                    step = flow.send(None)
                else:
                    step = flow.send(await http.send(step, auth=None))
        except StopIteration as finished:
            done: TopUp = finished.value
        finally:
            flow.close()
    return _checked(done, strict)


def _origin(gateway: str) -> str:
    try:
        url = httpx.URL(gateway)
    except httpx.InvalidURL as exc:
        raise X402Error(f"invalid gateway URL {gateway!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise X402Error(f"invalid gateway URL {gateway!r}: expected http(s)://host[:port]")
    return origin_of(url)


def _discovery(response: httpx.Response) -> Discovery:
    document: Any = None
    if response.status_code == 200:
        try:
            document = response.json()
        except (ValueError, UnicodeDecodeError):
            document = None
    discovery = Discovery.parse(document)
    if discovery is None:
        raise TopUpFailed(
            f"{response.url} is no x402 discovery document (HTTP {response.status_code})",
            "no_discovery",
            response.status_code,
        )
    return discovery


def _checked(done: TopUp, strict: bool) -> TopUp:
    if not done.verified:
        message = f"top-up receipt {done.receipt_id or '?'}: {done.problem}"
        if strict:
            raise InvalidReceipt(message)
        warnings.warn(message, ReceiptWarning, stacklevel=3)
    return done
