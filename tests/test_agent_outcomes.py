"""Every answer that may have cost an agent money says so, and a proof goes only where it
was priced: a redirect thief, a paid redirect, a timeout on a paid answer, a refusal.

The real stack (tests/conftest.py `stack`) plus, for the thief, a small HTTP server on
loopback that redirects only its /.well-known/x402 to the gateway and answers the priced
path itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import requests

from sidecar.agent import (
    InsufficientFunds,
    PaymentOutcomeUnknown,
    RetryPaid,
    UnknownPayer,
    Wallet,
    X402Auth,
    receipt_of,
    refusal_of,
)
from sidecar.agent.requests_adapter import x402_session
from sidecar.core.errors import NonceReused
from sidecar.tools.stack import Stack

ATLAS = "/api/v1/agent/pay-api/atlas"  # 0.25 USDF, charged on the request
PAYMENT_HEADERS = ("x-payment", "payment-signature")


class Thief:
    """Redirects /.well-known/x402 to the gateway; answers everything else itself, and
    remembers every request's headers."""

    def __init__(self, gateway: str) -> None:
        seen: list[dict[str, str]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append({k.lower(): v for k, v in self.headers.items()})
                if self.path.startswith("/.well-known/x402"):
                    self.send_response(302)
                    self.send_header("Location", gateway + "/.well-known/x402")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b'{"free": "lunch"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def proofs(self) -> list[dict[str, str]]:
        return [h for h in self.seen if any(name in h for name in PAYMENT_HEADERS)]


@pytest.fixture
def thief(stack: Stack) -> Iterator[Thief]:
    running = Thief(stack.url)
    running.thread.start()
    yield running
    running.server.shutdown()
    running.server.server_close()


async def funded(stack: Stack, amount: str = "10", **guards: Any) -> Wallet:
    wallet = Wallet.generate(**guards)
    await stack.fund(wallet.public_key, amount)
    return wallet


def _sync_get(auth: X402Auth, url: str, **client: Any) -> httpx.Response:
    with httpx.Client(auth=auth, **client) as http:
        return http.get(url)


async def test_a_redirected_price_list_never_gets_a_proof_over_httpx(
    stack: Stack, thief: Thief
) -> None:
    wallet = await funded(stack)
    auth = X402Auth(wallet)
    response = await asyncio.to_thread(_sync_get, auth, thief.url + ATLAS, follow_redirects=True)
    async with httpx.AsyncClient(auth=X402Auth(wallet), follow_redirects=True) as http:
        again = await http.get(thief.url + ATLAS)
    assert response.json() == again.json() == {"free": "lunch"}
    assert thief.proofs() == []  # no proof ever reached the thief
    assert receipt_of(response) is None and wallet.spent() == "0"
    assert await stack.balance(wallet.public_key) == 10_000_000  # the gateway charged nothing
    # The gateway's price list is kept for the gateway's origin, not the thief's.
    assert auth.discoveries.fresh(thief.url) is not None
    assert auth.discoveries.fresh(thief.url).discovery is None  # type: ignore[union-attr]
    assert auth.discoveries.last(stack.url) is not None


async def test_a_redirected_price_list_never_gets_a_proof_over_requests(
    stack: Stack, thief: Thief
) -> None:
    wallet = await funded(stack)
    session = x402_session(wallet)
    response = await asyncio.to_thread(session.get, thief.url + ATLAS)
    assert response.json() == {"free": "lunch"}
    assert thief.proofs() == []
    assert await stack.balance(wallet.public_key) == 10_000_000


def _wire_headers() -> tuple[list[dict[str, str]], Any]:
    """A caller's own httpcore trace hook: the headers of each hop as they go out."""
    hops: list[dict[str, str]] = []

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "http11.send_request_headers.started":
            request = info["request"]
            hops.append({k.decode().lower(): v.decode() for k, v in request.headers})

    return hops, trace


async def test_a_paid_redirect_is_the_paid_answer_and_the_proof_stays_behind(
    stack: Stack,
) -> None:
    wallet = await funded(stack, budget="10")
    hops, trace = _wire_headers()
    url = f"{stack.url}{ATLAS}?redirect=/api/v1/free/landing"

    def get() -> httpx.Response:
        with httpx.Client(auth=X402Auth(wallet), follow_redirects=True) as http:
            return http.get(url, extensions={"trace": trace})

    response = await asyncio.to_thread(get)
    assert response.status_code == 200 and response.json()["path"] == "/api/v1/free/landing"
    assert [hop.status_code for hop in response.history][-1] == 302
    receipt = receipt_of(response)  # the 302's receipt, kept on the final response
    assert receipt is not None and receipt.verified and receipt.amount == "0.25"
    assert wallet.spent() == "0.25" and wallet.remaining() == "9.75"
    assert await stack.balance(wallet.public_key) == 9_750_000  # charged once
    paid = [hop for hop in hops if "x-payment" in hop]
    assert len(paid) == 1 and len(hops) >= 2  # the redirected request carried no proof


async def test_a_paid_redirect_over_requests_is_charged_once(stack: Stack) -> None:
    wallet = await funded(stack, budget="10")
    session = x402_session(wallet)
    url = f"{stack.url}{ATLAS}?redirect=/api/v1/free/landing"
    response = await asyncio.to_thread(session.get, url)
    assert response.status_code == 200 and response.history[0].status_code == 302
    receipt = receipt_of(response)
    assert receipt is not None and receipt.verified and receipt.amount == "0.25"
    assert wallet.spent() == "0.25"
    assert await stack.balance(wallet.public_key) == 9_750_000


def _slow_sync(wallet: Wallet, url: str) -> PaymentOutcomeUnknown:
    with httpx.Client(auth=X402Auth(wallet), timeout=1) as http:
        try:
            http.get(url)
        except PaymentOutcomeUnknown as exc:
            return exc
    raise AssertionError("a timeout after the proof was sent must say the outcome is unknown")


def _slow_requests(wallet: Wallet, url: str) -> PaymentOutcomeUnknown:
    try:  # retries=0: the adapter would otherwise send the same proof again (below)
        x402_session(X402Auth(wallet, retries=0)).get(url, timeout=1)
    except PaymentOutcomeUnknown as exc:
        return exc
    raise AssertionError("a timeout after the proof was sent must say the outcome is unknown")


async def _slow_async(wallet: Wallet, url: str) -> PaymentOutcomeUnknown:
    async with httpx.AsyncClient(auth=X402Auth(wallet), timeout=1) as http:
        try:
            await http.get(url)
        except PaymentOutcomeUnknown as exc:
            return exc
    raise AssertionError("a timeout after the proof was sent must say the outcome is unknown")


@pytest.mark.parametrize("driver", ["httpx", "async", "requests"])
async def test_a_timeout_on_a_paid_answer_is_an_unknown_outcome(stack: Stack, driver: str) -> None:
    wallet = await funded(stack, budget="10")
    url = f"{stack.url}{ATLAS}?sleep=3"
    if driver == "httpx":
        error = await asyncio.to_thread(_slow_sync, wallet, url)
    elif driver == "async":
        error = await _slow_async(wallet, url)
    else:
        error = await asyncio.to_thread(_slow_requests, wallet, url)
    payment = error.payment
    assert payment["payer"] == wallet.public_key and payment["amount"] == "0.25"
    assert payment["resource"] == f"GET {ATLAS}" and len(payment["nonce"]) > 10
    assert payment["origin"] == stack.url and "may have been charged" in str(error)
    assert "Timeout" in type(error.__cause__).__name__  # httpx's, httpcore's or requests'

    # The wallet counts it (the worst case), and the budget left is exact, not stuck.
    assert wallet.spent() == "0.25" and wallet.remaining() == "9.75"
    assert await stack.balance(wallet.public_key) == 9_750_000  # it was charged
    # The same proof is charged at most once: sent for another request (without the
    # query), it is a conflict that names the receipt of its charge (docs/protocol.md §13).
    async with httpx.AsyncClient() as http:
        resent = await http.get(url.partition("?")[0], headers=error.resend_headers)
    assert (resent.status_code, resent.json()["error"]) == (409, "payment_identifier_conflict")
    assert resent.json()["receipt_id"]
    assert await stack.balance(wallet.public_key) == 9_750_000


async def test_refusals_are_typed_with_the_next_step(stack: Stack) -> None:
    stranger = Wallet.generate()
    async with httpx.AsyncClient(auth=X402Auth(stranger)) as http:
        unknown = await http.get(stack.url + ATLAS)
        poor = await funded(stack, "0.1")
        broke = await httpx.AsyncClient(auth=X402Auth(poor)).get(stack.url + ATLAS)
    refused = refusal_of(unknown)
    assert isinstance(refused, UnknownPayer) and unknown.status_code == 402
    assert "x402 payer register" in refused.next_step and "x402 topup" in refused.next_step  # type: ignore[attr-defined]
    assert stranger.public_key in str(refused)
    short = refusal_of(broke)
    assert isinstance(short, InsufficientFunds)
    assert "0.1" in str(short) and "x402 topup" in str(short)


def _resend_sync(wallet: Wallet, url: str, nonces: list[str]) -> httpx.Response | None:
    def seen(request: httpx.Request) -> None:
        if "x-payment" in request.headers:
            nonces.append(json.loads(base64.b64decode(request.headers["x-payment"]))["nonce"])

    auth = X402Auth(wallet)
    with httpx.Client(
        auth=auth, timeout=1, transport=RetryPaid(), event_hooks={"request": [seen]}
    ) as http:
        try:
            return http.get(url)
        except PaymentOutcomeUnknown:
            return None


def _resend_requests(wallet: Wallet, url: str) -> requests.Response | None:
    try:
        return x402_session(wallet).get(url, timeout=1)
    except PaymentOutcomeUnknown:
        return None


@pytest.mark.parametrize("driver", ["httpx", "requests"])
async def test_a_timeout_on_a_paid_request_sends_the_same_proof_again(
    stack: Stack, driver: str
) -> None:
    """The SDK's retry after a timeout (httpx's RetryPaid transport; the requests adapter
    by itself) re-sends the same proof, never a new one: one charge, counted once. Without
    the ledger's redelivery the retry is answered 402 nonce_reused with the receipt id of
    that charge; with it, the retry passes again (and here times out again)."""
    wallet = await funded(stack, budget="10")
    url = f"{stack.url}{ATLAS}?sleep=3"
    nonces: list[str] = []
    if driver == "httpx":
        response: Any = await asyncio.to_thread(_resend_sync, wallet, url, nonces)
    else:
        response = await asyncio.to_thread(_resend_requests, wallet, url)
    if response is not None:  # the retry was answered: the charge it names is the one
        assert response.status_code == 402 and response.json()["error"] == "nonce_reused"
        assert isinstance(refusal_of(response), NonceReused)
    if driver == "httpx":
        assert len(nonces) == 1  # one proof signed: the transport re-sent it as it was
    assert wallet.spent() == "0.25"  # charged, counted once
    assert await stack.balance(wallet.public_key) == 9_750_000
    await asyncio.sleep(0.2)  # decision lines are written after the answer
    checks = [d for d in stack.decisions() if d["payer"] == wallet.public_key]
    assert len(checks) >= 2 and checks[0]["decision"] == "allow"  # the same proof, again
