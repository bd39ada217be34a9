"""The side port's self-serve channel routes before any ledger step: off when the operator
turns them off (404, not in discovery), and a request refused by its shape or signature
without Redis being asked (this ledger points nowhere)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest

from sidecar.core import channel_requests, protocol, vouchers
from sidecar.core.decision import Gateway
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.server.config import Settings
from sidecar.server.self_channels import SelfChannels
from sidecar.server.side_port import SidePort

GATEWAY = Gateway(Identity.generate(), b"k" * 32)
OPEN = "/x402/channel/open"


@pytest.fixture
async def ledger() -> AsyncIterator[Ledger]:
    client = Ledger.from_url("redis://127.0.0.1:1/0", timeout=0.2)  # nothing listens
    yield client
    await client.close()


def port(ledger: Ledger, channels: dict[str, object]) -> SidePort:
    settings = Settings.from_mapping({"channels": channels}, env={})
    routes, terms = settings.route_table(), settings.channel_terms()
    served = SelfChannels(GATEWAY, ledger, terms, routes.assets) if terms else None
    return SidePort(routes, GATEWAY, ledger, None, served)


async def test_off_means_not_found_and_not_in_discovery(ledger: Ledger) -> None:
    side = port(ledger, {"self_serve": False})
    status, _kind, body, *_ = await side.respond("POST", OPEN, {})
    assert (status, json.loads(body)["error"]) == (404, "not_found")
    _status, _kind, document, *_ = await side.respond("GET", protocol.DISCOVERY_PATH, {})
    assert "channels" not in json.loads(document)


def header(wallet: Identity, **changes: object) -> dict[str, str]:
    terms = {
        "action": "open",
        "channel_id": vouchers.new_channel_id(),
        "asset": "USDF",
        "deposit": "1",
        "ttl_seconds": 60,
        "payee": GATEWAY.payee,
        "nonce": protocol.new_nonce(),
        "expires_at": int(time.time()) + 30,
        **changes,
    }
    signed = channel_requests.sign_request(terms, wallet)
    return {channel_requests.HEADER: protocol.encode_header(signed)}


@pytest.mark.parametrize(
    ("method", "changes", "status", "reason"),
    [
        ("GET", {}, 400, "bad_request"),
        ("POST", {"deposit": "0.001"}, 400, "bad_request"),  # under the default minimum
        ("POST", {"ttl_seconds": 86401}, 400, "bad_request"),
        ("POST", {"payee": "gw_other"}, 402, "invoice_mismatch"),
        ("POST", {"expires_at": 1}, 402, "invoice_expired"),
    ],
)
async def test_refused_before_the_ledger_is_asked(
    ledger: Ledger, method: str, changes: dict[str, object], status: int, reason: str
) -> None:
    side = port(ledger, {})
    answer = await side.respond(method, OPEN, header(Identity.generate(), **changes))
    assert (answer[0], json.loads(answer[2])["error"]) == (status, reason)


async def test_the_ledger_down_is_a_503_with_retry_after(ledger: Ledger) -> None:
    side = port(ledger, {})
    answer = await side.respond("POST", OPEN, header(Identity.generate()))
    assert (answer[0], json.loads(answer[2])["error"]) == (503, "ledger_unavailable")
    assert answer[3:] == ({"retry-after": "1"},)
