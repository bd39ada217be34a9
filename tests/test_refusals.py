"""Nobody rides free and nobody is charged for a refusal: the sidecar's side of the outside
review, each case through the real Envoy, sidecar and Redis.

- a method that is not a canonical upper-case token (HTTP/2 lets a client send `get`) is
  refused, never passed free;
- equivalent spellings of a priced path are priced as the route they reach (one trailing
  slash, HEAD as GET); odd ones (`;params`, case, `.json`, backslash) are refused;
- a zero price is a free route; `unlisted: deny` refuses what no route lists;
- a debit Redis runs after the sidecar answered 503 (Redis stalled) refuses: 503 never
  charges, and the same proof pays once Redis is back;
- a channel close counts the vouchers it accepted, not the last sequence number;
- the gateway's key files are 0600.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import stat
from collections.abc import Iterator
from typing import Any

import h2.connection
import h2.events
import httpx
import pytest

from sidecar.core import protocol, vouchers
from sidecar.core.decision import UPSTREAM_HEADERS
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
from sidecar.server.authz.grpc_transport import check_message
from sidecar.tools.stack import LOOPBACK, Stack
from tests.support.cli import x402
from tests.support.inprocess import check_request, servicer_for
from tests.support.payers import funded_payer, pay_direct
from tests.support.routes import ROUTES
from tests.support.stacks import over_http

ATLAS = "/api/v1/agent/pay-api/atlas"  # GET, 0.25, in the table and annotated in Envoy
VERIFY = "/api/v1/trade/verify/T-1"  # GET {trade_id}, 0.01, both
SIGNAL = "/api/v1/market/signal"  # GET, 0.0005, the table only
ANNOTATED = "/api/v1/annotated"  # POST, 0.02, the Envoy annotation only


def h2_request(port: int, method: str, path: str) -> tuple[int, bytes]:
    """One HTTP/2 (prior knowledge) request with the method exactly as given: no client
    library would send `get`, an attacker's does."""
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        headers = [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"{LOOPBACK}:{port}"),
        ]
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body = 0, b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    return status, body
            sock.sendall(conn.data_to_send())


def raw_request(port: int, method: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """HTTP/1.1 with the request line exactly as given (httpx would resolve `\\..\\`)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def upstream_requests(stack: Stack) -> int:
    return stack.envoy_counter("cluster.service.upstream_rq_total")


# -- methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", ATLAS),
        ("Get", ATLAS),
        ("get", VERIFY),
        ("get", SIGNAL),
        ("post", ANNOTATED),
        ("get", "/api/v1/agents/discover"),  # a free route: the service may upper-case it
    ],
)
def test_http2_method_case_is_refused_not_free(stack: Stack, method: str, path: str) -> None:
    before = upstream_requests(stack)
    status, body = h2_request(stack.ports["envoy"], method, path)
    assert status == 400, body
    assert json.loads(body)["error"] == "bad_request"
    assert upstream_requests(stack) == before  # the service never saw it


def test_http2_canonical_methods_still_work(stack: Stack) -> None:
    assert h2_request(stack.ports["envoy"], "GET", ATLAS)[0] == 402
    assert h2_request(stack.ports["envoy"], "GET", "/api/v1/agents/discover")[0] == 200


# -- path spellings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "seen", "route"),
    [
        ("GET", ATLAS + "/", ATLAS + "/", "atlas"),
        ("GET", VERIFY + "/", VERIFY + "/", "verify"),
        ("GET", SIGNAL + "/", SIGNAL + "/", "signal"),
        ("HEAD", ATLAS, ATLAS, "atlas"),
        ("HEAD", VERIFY, VERIFY, "verify"),
        ("HEAD", SIGNAL + "/", SIGNAL + "/", "signal"),
        # Envoy's path normalization: dot segments resolved, backslashes are slashes.
        ("GET", ATLAS + "/.", ATLAS + "/", "atlas"),
        ("GET", ATLAS + "\\", ATLAS + "/", "atlas"),
        ("GET", "/api/v1/agent/pay-api/x\\..\\atlas", ATLAS, "atlas"),
    ],
)
def test_equivalent_spellings_are_priced_as_the_route(
    stack: Stack, method: str, path: str, seen: str, route: str
) -> None:
    status, headers, _body = raw_request(stack.ports["envoy"], method, path)
    assert status == 402
    decoded = protocol.decode_header(headers["payment-required"])
    assert decoded["accepts"][0]["extra"]["resource"] == f"{method} {seen}"
    lines = stack.wait_decisions(lambda d: (d["method"], d["path"]) == (method, seen))
    assert lines and (lines[-1]["route"], lines[-1]["reason"]) == (route, "payment_required")


@pytest.mark.parametrize(
    "path",
    [
        ATLAS + ";jsessionid=0",
        ATLAS.upper(),
        "/api/v1/agent/pay-api/Atlas",
        ATLAS + ".json",
        "/api/v1/trade/verify;v=1/T-1",
        SIGNAL + ".xml",
        SIGNAL.upper() + "/",
    ],
)
def test_odd_spellings_of_priced_paths_are_refused(stack: Stack, path: str) -> None:
    before = upstream_requests(stack)
    for method in ("GET", "HEAD"):
        status, _headers, body = raw_request(stack.ports["envoy"], method, path)
        assert status == 400, (method, path, body)
        if method == "GET":
            assert json.loads(body)["error"] == "bad_request"
    assert upstream_requests(stack) == before


async def test_head_pays_like_get(stack: Stack, ledger: Ledger, client: httpx.AsyncClient) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.head(ATLAS)
    assert challenge.status_code == 402
    invoice = protocol.decode_header(challenge.headers["payment-required"])["accepts"][0]
    paid = await client.head(ATLAS, headers=pay_invoice_terms(invoice["extra"], wallet))
    assert paid.status_code == 200
    assert (await ledger.account(wallet.public_key)).balances["USDF"] == 750_000


def pay_invoice_terms(terms: dict[str, Any], wallet: Any) -> dict[str, str]:
    return {"X-Payment": protocol.encode_header(protocol.sign_proof(terms, wallet))}


async def test_unpriced_methods_and_unrelated_paths_stay_free(client: httpx.AsyncClient) -> None:
    assert (await client.post(ATLAS)).status_code == 200  # ATLAS is priced for GET only
    assert (await client.post(ATLAS + "/")).status_code == 200
    assert (await client.get("/static/app.js")).status_code == 200


# -- zero prices and unlisted paths -------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_stack() -> Iterator[Stack]:
    routes = {
        **ROUTES,
        "evaluate": {"method": "GET", "path": "/api/v1/evaluate", "price": "0"},
    }
    envoy_routes = {
        **routes,
        "annotated-free": {"method": "GET", "path": "/api/v1/annotated-free", "price": "0"},
    }
    with Stack(routes, envoy_routes=envoy_routes, settings={"unlisted": "deny"}) as running:
        yield running


async def test_a_zero_price_is_a_free_route_in_both_sources(strict_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=strict_stack.url, timeout=10) as client:
        listed = await client.get("/api/v1/evaluate")
        assert listed.status_code == 200 and listed.json()["service"] == "demo-upstream"
        # Priced "0" by its Envoy annotation alone (not in the sidecar's table): also free;
        # over HTTP there are no Envoy-side prices: unlisted, so `unlisted: deny` refuses it.
        annotated = await client.get("/api/v1/annotated-free")
        assert annotated.status_code == (404 if over_http(strict_stack) else 200)
        assert (await client.get(ATLAS)).status_code == 402


async def test_unlisted_deny_refuses_what_no_route_lists(strict_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=strict_stack.url, timeout=10) as client:
        refused = await client.get("/api/v1/agents/discover")
        assert refused.status_code == 404
        assert refused.json()["error"] == "unknown_route"
        assert (await client.get("/.well-known/x402")).status_code == 200  # discovery is free
        assert (await client.get(ATLAS.upper())).json()["error"] == "bad_request"


# -- the gateway's word is never the client's --------------------------------------------------


async def test_free_answers_remove_the_gateways_upstream_headers(stack: Stack) -> None:
    """Defence in depth behind Envoy's edge strip: the sidecar's own free allow removes
    every header it asserts to the service."""
    servicer, ledger = servicer_for(stack)
    forged = {name: "VICTIM" for name in UPSTREAM_HEADERS}
    response = await check_message(
        servicer, check_request("GET", "/api/v1/agents/discover", forged)
    )
    await ledger.close()
    assert set(response.ok_response.headers_to_remove) >= set(UPSTREAM_HEADERS)


# -- a 503 never charges -------------------------------------------------------------------


async def test_a_stalled_redis_503_charges_nothing_and_the_proof_pays_later() -> None:
    with Stack(ROUTES, settings={"redis_timeout_ms": 300}) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 1_000_000)
        headers = pay_direct(stack, wallet, f"GET {VERIFY}", "0.01")
        redis_pid = stack.processes["redis"].popen.pid
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            os.kill(redis_pid, signal.SIGSTOP)  # Redis stalls; the debit waits in its socket
            try:
                stalled = await client.get(VERIFY, headers=headers)
                await asyncio.sleep(0.5)  # well past the script's deadline
            finally:
                os.kill(redis_pid, signal.SIGCONT)
            assert stalled.status_code == 503 and stalled.json()["error"] == "ledger_unavailable"
            assert stalled.headers["retry-after"] == "1"
            # Redis ran the queued debit on resuming: it refused, nothing moved.
            account = await ledger.account(wallet.public_key)
            assert account.balances["USDF"] == 1_000_000
            assert account.debited.get("USDF", 0) == 0
            assert await ledger.receipts(wallet.public_key) == []
            paid = await client.get(VERIFY, headers=headers)  # the same proof, Redis back
        assert paid.status_code == 200, paid.text
        assert (await ledger.account(wallet.public_key)).balances["USDF"] == 990_000
        assert len(await ledger.receipts(wallet.public_key)) == 1
        await ledger.close()
        late = stack.wait_decisions(lambda d: d.get("payer") == wallet.public_key, 2)
        assert [(d["status"], d["reason"]) for d in late] == [
            (503, "ledger_unavailable"),
            (200, "paid"),
        ]


# -- small defects -----------------------------------------------------------------------------


async def test_channel_close_counts_accepted_vouchers(stack: Stack, ledger: Ledger) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    payer = wallet.public_key
    channel_id, _ = await Channels(ledger).open(payer, "USDF", 100_000, stack.gateway_identity.kid)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        for sequence, cumulative in ((1, "0.01"), (50, "0.02"), (105, "0.03"), (106, "0.04")):
            voucher = vouchers.sign_voucher(
                {
                    "asset": "USDF",
                    "payee": stack.gateway_identity.kid,
                    "channel_id": channel_id,
                    "cumulative": cumulative,
                    "sequence": sequence,
                    "resource": f"GET {VERIFY}",
                },
                wallet,
            )
            response = await client.get(
                VERIFY, headers={"X-Payment": protocol.encode_header(voucher)}
            )
            assert response.status_code == 200, response.text
    run = await x402("channel", "close", payer, channel_id, "--config", str(stack.config_path))
    assert run.code == 0, run.err
    assert "spent 0.04 in 4 vouchers" in run.out


def test_the_gateways_secret_files_are_0600(stack: Stack) -> None:
    for name in ("signing.key", "invoice.secret"):
        assert stat.S_IMODE((stack.dir / name).stat().st_mode) == 0o600, name
