"""Self-serve channels, the agent's side: open a channel from the wallet's own prepaid
balance, and close it, with requests signed by its Ed25519 key (docs/protocol.md §9).

The flows are generators of HTTP requests (the discovery document, then the signed
request), so one implementation serves httpx's sync and async clients
(`PaymentChannel.open` / `aopen`, `close` / `aclose` in channel.py). Every answer's receipt
is checked against the gateway's keys from discovery before it is believed.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.agent.discovery import Discovery, origin_of
from sidecar.core import channel_requests, protocol, vouchers
from sidecar.core.errors import ChannelRequestFailed, MalformedReceipt, X402Error
from sidecar.core.identity import Identity
from sidecar.core.receipts import Receipt

Flow = Generator[httpx.Request, httpx.Response, Any]
REQUEST_TTL = 60  # seconds a signed request stays good (at most the gateway's window)


@dataclass(frozen=True)
class ChannelTerms:
    """Discovery's `channels`: where agents open and close, and within which bounds."""

    open_path: str
    close_path: str
    asset: str
    min_deposit: str
    max_deposit: str
    max_ttl_seconds: int

    @classmethod
    def parse(cls, doc: Any) -> ChannelTerms | None:
        if not isinstance(doc, dict):
            return None
        try:
            opening, closing = doc["open"], doc["close"]
            terms = cls(
                opening["path"],
                closing["path"],
                doc["asset"],
                doc["min_deposit"],
                doc["max_deposit"],
                doc["max_ttl_seconds"],
            )
        except (KeyError, TypeError):
            return None
        strings = (terms.open_path, terms.close_path, terms.asset, terms.min_deposit)
        if not all(isinstance(v, str) for v in (*strings, terms.max_deposit)):
            return None
        return terms if type(terms.max_ttl_seconds) is int else None


@dataclass(frozen=True)
class ChannelGateway:
    """What the flows learned of the gateway: its origin, discovery and channel terms."""

    origin: str
    discovery: Discovery
    terms: ChannelTerms


@dataclass(frozen=True)
class Opened:
    gateway: ChannelGateway
    channel_id: str
    asset: str
    deposit: str
    balance: str  # the payer's prepaid balance left
    expires_at: int
    receipt: Receipt


@dataclass(frozen=True)
class Closed:
    """A closed channel: what it paid (`spent`), what came back (`refund`), the payer's
    prepaid balance after it, and the gateway's signed close receipt."""

    channel_id: str
    asset: str
    deposit: str
    spent: str
    refund: str
    balance: str
    already_closed: bool  # it had been closed before (by its expiry, or an earlier close)
    receipt: Receipt


def origin(gateway_url: str) -> str:
    try:
        url = httpx.URL(gateway_url)
    except httpx.InvalidURL as exc:
        raise X402Error(f"invalid gateway URL {gateway_url!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise X402Error(f"invalid gateway URL {gateway_url!r}: expected http(s)://host[:port]")
    return origin_of(url)


def gateway_flow(gateway_url: str) -> Flow:
    """The gateway's discovery document, and its self-serve channel terms."""
    base = origin(gateway_url)
    found = yield httpx.Request("GET", base + protocol.DISCOVERY_PATH)
    document: Any = None
    if found.status_code == 200:
        try:
            document = found.json()
        except (ValueError, UnicodeDecodeError):
            document = None
    discovery = Discovery.parse(document)
    if discovery is None:
        raise ChannelRequestFailed(
            f"{found.url} is no x402 discovery document", "no_discovery", found.status_code
        )
    terms = ChannelTerms.parse(document.get("channels"))
    if terms is None:
        raise ChannelRequestFailed(
            f"{base} does not let agents open their own channels", "no_self_serve_channels"
        )
    return ChannelGateway(base, discovery, terms)


def open_flow(gateway_url: str, identity: Identity, deposit: str, ttl_seconds: int | None) -> Flow:
    gateway: ChannelGateway = yield from gateway_flow(gateway_url)
    terms, discovery = gateway.terms, gateway.discovery
    channel_id = vouchers.new_channel_id()
    signed = channel_requests.sign_request(
        {
            "action": channel_requests.OPEN,
            "channel_id": channel_id,
            "asset": terms.asset,
            "deposit": deposit,
            "ttl_seconds": ttl_seconds or terms.max_ttl_seconds,
            **_replay_guard(discovery),
        },
        identity,
    )
    body, receipt = yield from _send(gateway, terms.open_path, signed)
    expect = {"channel_id": channel_id, "payer": identity.public_key, "asset": terms.asset}
    _matches(receipt, {**expect, "kind": "channel_open"})
    return Opened(
        gateway,
        channel_id,
        terms.asset,
        str(body.get("deposit", deposit)),
        str(body.get("balance", "")),
        int(body.get("expires_at", 0)),
        receipt,
    )


def close_flow(gateway_url: str, identity: Identity, channel_id: str) -> Flow:
    gateway: ChannelGateway = yield from gateway_flow(gateway_url)
    signed = channel_requests.sign_request(
        {
            "action": channel_requests.CLOSE,
            "channel_id": channel_id,
            **_replay_guard(gateway.discovery),
        },
        identity,
    )
    body, receipt = yield from _send(gateway, gateway.terms.close_path, signed)
    _matches(receipt, {"channel_id": channel_id, "payer": identity.public_key})
    return Closed(
        channel_id,
        receipt.asset,
        str(receipt.body.get("deposit", "")),
        receipt.amount,
        str(receipt.body.get("refund", "")),
        str(receipt.body.get("balance", "")),
        bool(body.get("already_closed")),
        receipt,
    )


def _replay_guard(discovery: Discovery) -> dict[str, Any]:
    ttl = max(1, min(REQUEST_TTL, discovery.max_direct_ttl))
    return {
        "payee": discovery.payee,
        "nonce": protocol.new_nonce(),
        "expires_at": int(time.time()) + ttl,
    }


def _send(gateway: ChannelGateway, path: str, signed: Mapping[str, Any]) -> Flow:
    """POST the signed request; (the answer's body, its verified receipt)."""
    headers = {channel_requests.HEADER: protocol.encode_header(signed)}
    response = yield httpx.Request("POST", gateway.origin + path, headers=headers)
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ChannelRequestFailed(
            f"{path}: HTTP {response.status_code} without a JSON answer",
            f"http_{response.status_code}",
            response.status_code,
        )
    if response.status_code != 200:
        reason = str(body.get("error", f"http_{response.status_code}"))
        message = str(body.get("message", reason))
        raise ChannelRequestFailed(f"{path}: {message}", reason, response.status_code)
    try:
        receipt = Receipt.from_wire(body.get("receipt"))
    except MalformedReceipt as exc:
        raise ChannelRequestFailed(f"{path}: {exc}", "bad_receipt", 200) from None
    if not receipt.verify(gateway.discovery.keys):
        raise ChannelRequestFailed(
            f"{path}: the receipt does not verify against the gateway's keys", "bad_receipt", 200
        )
    return body, receipt


def _matches(receipt: Receipt, expected: Mapping[str, Any]) -> None:
    for name, value in expected.items():
        if receipt.body.get(name) != value:
            raise ChannelRequestFailed(
                f"the receipt's {name} is not the request's", "bad_receipt", 200
            )


def run(flow: Flow, client: httpx.Client) -> Any:
    """Drive a flow with a sync client; its result."""
    try:
        request = next(flow)
        while True:
            request = flow.send(client.send(request, auth=None))
    except StopIteration as done:
        return done.value
    finally:
        flow.close()


async def arun(flow: Flow, client: httpx.AsyncClient) -> Any:
    """Drive a flow with an async client; its result."""
    try:
        request = next(flow)
        while True:
            request = flow.send(await client.send(request, auth=None))
    except StopIteration as done:
        return done.value
    finally:
        flow.close()
