"""The agent SDK against the real product on loopback: Redis, the sidecar, Envoy, upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests

from sidecar.agent.auth import X402Auth, receipt_of
from sidecar.agent.proofs import parse_invoice
from sidecar.agent.requests_adapter import X402Adapter, x402_session
from sidecar.agent.wallet import Wallet
from sidecar.core.errors import (
    AssetNotAllowed,
    BudgetExceeded,
    GuardRefused,
    InvalidChallenge,
    InvalidReceipt,
    MaxAmountExceeded,
    PayeeNotAllowed,
    ReceiptWarning,
)
from sidecar.core.identity import Identity
from sidecar.tools.stack import Stack
from tests.support.stacks import grpc_only_prices

ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {"method": "GET", "path": "/api/v1/agent/pay-api/atlas", "price": "0.25"},
    "verify": {"method": "GET", "path": "/api/v1/trade/verify/{trade_id}", "price": "0.01"},
    "signal": {"method": "GET", "path": "/api/v1/market/signal/{symbol}", "price": "0.0005"},
    "deep": {"method": "POST", "path": "/api/v1/agent/pay-api/atlas/deep", "price": "5"},
    "eu-report": {"method": "GET", "path": "/api/v1/eu/report", "price": "1.5", "asset": "EURF"},
}
ASSETS = {"USDF": 6, "EURF": 2}
ATLAS = "/api/v1/agent/pay-api/atlas"


@pytest.fixture(scope="module")
def gw() -> Iterator[Stack]:
    with Stack(ROUTES, settings={"assets": ASSETS}) as running:
        yield running


@pytest.fixture(scope="module")
def repriced() -> Iterator[Stack]:
    """The price list (sidecar config) says 0.01; Envoy's route annotation charges 0.02."""
    envoy_routes = {"verify": {**ROUTES["verify"], "price": "0.02"}}
    with Stack({"verify": ROUTES["verify"]}, envoy_routes=envoy_routes) as running:
        yield running


async def funded(stack: Stack, amount: str = "10", **guards: Any) -> Wallet:
    wallet = Wallet.generate(**guards)
    await stack.fund(wallet.public_key, amount)
    return wallet


def decisions_of(stack: Stack, payer: str, count: int) -> list[dict[str, Any]]:
    """The decision lines naming `payer`, once `count` of them are written (or 5 s passed)."""
    return stack.wait_decisions(lambda line: line.get("payer") == payer, count)


class Sent:
    """httpx event hook: the requests a client actually put on the wire."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bool]] = []

    def __call__(self, request: httpx.Request) -> None:
        self.requests.append((request.method, request.url.path, "x-payment" in request.headers))

    @property
    def hooks(self) -> dict[str, list[Callable[..., Any]]]:
        return {"request": [self]}

    @property
    def ahooks(self) -> dict[str, list[Callable[..., Any]]]:
        async def hook(request: httpx.Request) -> None:
            self(request)

        return {"request": [hook]}


# -- the challenge flow -------------------------------------------------------------------


async def test_a_402_is_paid_once_and_the_verified_receipt_is_on_the_response(
    gw: Stack,
) -> None:
    wallet = await funded(gw)
    sent = Sent()
    auth = X402Auth(wallet, direct=False, strict=True)
    with httpx.Client(base_url=gw.url, auth=auth, event_hooks=sent.hooks) as client:
        response = await asyncio.to_thread(client.get, ATLAS, params={"q": "agents"})
    assert response.status_code == 200
    body = response.json()
    assert body["payer"] == wallet.public_key and body["proof_header_seen"] is False
    receipt = response.extensions["x402_receipt"]
    assert receipt is receipt_of(response) and receipt is not None
    assert receipt.verified and receipt.invoice_id.startswith("inv_")
    assert (receipt.amount, receipt.asset, receipt.balance) == ("0.25", "USDF", "9.75")
    assert (receipt.payer, receipt.resource) == (wallet.public_key, f"GET {ATLAS}")
    # 402, then the discovery document (for the receipt keys), then the paid retry.
    assert sent.requests == [
        ("GET", ATLAS, False), ("GET", "/.well-known/x402", False), ("GET", ATLAS, True),
    ]  # fmt: skip
    assert [d["reason"] for d in decisions_of(gw, wallet.public_key, 1)] == ["paid"]
    challenge = [d for d in gw.decisions() if d["invoice_id"] == receipt.invoice_id]
    assert [d["reason"] for d in challenge] == ["payment_required", "paid"]
    assert await gw.balance(wallet.public_key) == 9_750_000
    assert wallet.spent() == "0.25"


async def test_a_refused_payment_is_not_retried_and_gives_the_budget_back(gw: Stack) -> None:
    wallet = await funded(gw, "0.2", budget="1")
    for direct in (False, True):
        sent = Sent()
        auth = X402Auth(wallet, direct=direct)
        async with httpx.AsyncClient(base_url=gw.url, auth=auth, event_hooks=sent.ahooks) as c:
            response = await c.get(ATLAS)
        assert response.status_code == 402
        assert response.json()["error"] == "insufficient_funds"
        assert receipt_of(response) is None
        assert [paid for _m, path, paid in sent.requests if path == ATLAS].count(True) == 1
    lines = decisions_of(gw, wallet.public_key, 2)
    assert [d["reason"] for d in lines] == ["insufficient_funds", "insufficient_funds"]
    assert (wallet.spent(), wallet.remaining()) == ("0", "1")
    assert await gw.balance(wallet.public_key) == 200_000


async def test_an_unregistered_wallet_gets_the_gateways_answer_not_a_loop(gw: Stack) -> None:
    wallet = Wallet.generate()
    async with httpx.AsyncClient(base_url=gw.url, auth=X402Auth(wallet)) as client:
        response = await client.get("/api/v1/trade/verify/T-1")
    assert (response.status_code, response.json()["error"]) == (402, "unknown_payer")
    assert len(decisions_of(gw, wallet.public_key, 1)) == 1


async def test_free_routes_pass_without_paying(gw: Stack) -> None:
    wallet = Wallet.generate()  # not even registered
    async with httpx.AsyncClient(base_url=gw.url, auth=X402Auth(wallet)) as client:
        response = await client.get("/api/v1/agents/discover")
    assert response.status_code == 200 and receipt_of(response) is None
    assert wallet.spent() == "0"


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["challenge", "direct"])
async def test_100_concurrent_paid_calls_through_one_async_client(gw: Stack, direct: bool) -> None:
    wallet = await funded(gw, "1")
    auth = X402Auth(wallet, direct=direct, strict=True)
    async with httpx.AsyncClient(base_url=gw.url, auth=auth, timeout=30) as client:
        responses = await asyncio.gather(
            *(client.get(f"/api/v1/trade/verify/T-{i}") for i in range(100))
        )
    assert [r.status_code for r in responses] == [200] * 100
    receipts = [receipt_of(r) for r in responses]
    assert all(r is not None and r.verified for r in receipts)
    assert len({r.receipt_id for r in receipts if r is not None}) == 100
    assert len({r.nonce for r in receipts if r is not None}) == 100
    assert await gw.balance(wallet.public_key) == 1_000_000 - 100 * 10_000
    assert wallet.spent() == "1"
    paid = [d for d in decisions_of(gw, wallet.public_key, 100) if d["reason"] == "paid"]
    assert len(paid) == 100


async def test_threads_share_one_sync_client_and_one_auth(gw: Stack) -> None:
    wallet = await funded(gw, "1")
    auth = X402Auth(wallet, direct=False, strict=True)
    with httpx.Client(base_url=gw.url, auth=auth) as client, ThreadPoolExecutor(8) as pool:
        responses = await asyncio.to_thread(
            lambda: list(pool.map(lambda i: client.get(f"/api/v1/market/signal/S{i}"), range(40)))
        )
    assert [r.status_code for r in responses] == [200] * 40
    assert len({r.extensions["x402_receipt"].receipt_id for r in responses}) == 40
    assert await gw.balance(wallet.public_key) == 1_000_000 - 40 * 500


# -- guards --------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["challenge", "direct"])
async def test_the_per_request_cap_refuses_before_signing(gw: Stack, direct: bool) -> None:
    wallet = await funded(gw, "10", max_amount="0.10")
    sent = Sent()
    auth = X402Auth(wallet, direct=direct)
    with (
        httpx.Client(base_url=gw.url, auth=auth, event_hooks=sent.hooks) as client,
        pytest.raises(MaxAmountExceeded) as refused,
    ):
        await asyncio.to_thread(client.get, ATLAS)
    assert refused.value.guard == "max_amount"
    assert "max_amount" in str(refused.value) and "0.25" in str(refused.value)
    assert not any(paid for _m, _p, paid in sent.requests)  # nothing signed, nothing sent
    # Direct mode knows the price from the list: the request never leaves the agent.
    assert [p for _m, p, _s in sent.requests if p == ATLAS] == ([] if direct else [ATLAS])
    assert await gw.balance(wallet.public_key) == 10_000_000
    assert wallet.spent() == "0"


async def test_the_total_budget_runs_out_mid_run_without_overspending(gw: Stack) -> None:
    wallet = await funded(gw, "10", budget="0.05")  # five calls at 0.01
    auth = X402Auth(wallet, direct=False, strict=True)
    async with httpx.AsyncClient(base_url=gw.url, auth=auth) as client:
        results = await asyncio.gather(
            *(client.get(f"/api/v1/trade/verify/B-{i}") for i in range(12)),
            return_exceptions=True,
        )
    paid = [r for r in results if isinstance(r, httpx.Response)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert (len(paid), len(refused)) == (5, 7), results
    assert all(r.status_code == 200 for r in paid)
    assert all(e.guard == "budget" for e in refused)
    assert await gw.balance(wallet.public_key) == 10_000_000 - 50_000
    assert (wallet.spent(), wallet.remaining()) == ("0.05", "0")
    lines = decisions_of(gw, wallet.public_key, 5)
    assert [d["reason"] for d in lines] == ["paid"] * 5  # refused ones were never signed


@pytest.mark.parametrize("direct", [False, True], ids=["challenge", "direct"])
async def test_a_disallowed_asset_is_refused_and_an_allowed_one_paid(
    gw: Stack, direct: bool
) -> None:
    wallet = await funded(gw, "10", assets=["USDF"])
    async with httpx.AsyncClient(base_url=gw.url, auth=X402Auth(wallet, direct=direct)) as c:
        with pytest.raises(AssetNotAllowed, match="EURF") as refused:
            await c.get("/api/v1/eu/report")
        assert refused.value.guard == "assets"
        assert (await c.get("/api/v1/trade/verify/A-1")).status_code == 200
    assert [d["reason"] for d in decisions_of(gw, wallet.public_key, 1)] == ["paid"]


async def test_a_disallowed_payee_is_refused_and_an_allowed_one_paid(gw: Stack) -> None:
    async with httpx.AsyncClient() as plain:
        payee = (await plain.get(f"{gw.url}/.well-known/x402")).json()["payee"]
    stranger = await funded(gw, "10", payees=["gw_someone_else"])
    trusted = await funded(gw, "10", payees=[payee])
    for direct in (False, True):
        async with httpx.AsyncClient(
            base_url=gw.url, auth=X402Auth(stranger, direct=direct)
        ) as client:
            with pytest.raises(PayeeNotAllowed, match=payee) as refused:
                await client.get(ATLAS)
        assert isinstance(refused.value, GuardRefused) and refused.value.guard == "payees"
    async with httpx.AsyncClient(base_url=gw.url, auth=X402Auth(trusted)) as client:
        assert (await client.get(ATLAS)).status_code == 200
    assert await gw.balance(stranger.public_key) == 10_000_000
    assert decisions_of(gw, stranger.public_key, 0) == []


# -- direct mode ---------------------------------------------------------------------------


def settled_counter(stack: Stack, name: str, expected: int) -> int:
    """Envoy updates a counter as the stream ends, a hair after the client has the reply."""
    deadline = time.monotonic() + 3
    while (value := stack.envoy_counter(name)) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


async def test_direct_mode_pays_in_exactly_one_http_request(gw: Stack) -> None:
    wallet = await funded(gw)
    auth = X402Auth(wallet, strict=True)  # direct is the default
    async with httpx.AsyncClient(base_url=gw.url, auth=auth) as client:
        await client.get("/api/v1/market/signal/WARM")  # fetches and caches the price list
        downstream = settled_counter(gw, "http.ingress.downstream_rq_completed", 0)
        upstream = settled_counter(gw, "cluster.service.upstream_rq_total", 0)
        discovery = settled_counter(gw, "cluster.x402_http.upstream_rq_total", 0)
        responses = [await client.get(f"/api/v1/market/signal/D{i}") for i in range(10)]
    assert [r.status_code for r in responses] == [200] * 10
    assert settled_counter(gw, "http.ingress.downstream_rq_completed", downstream + 10) == (
        downstream + 10
    )
    assert gw.envoy_counter("cluster.service.upstream_rq_total") == upstream + 10
    assert gw.envoy_counter("cluster.x402_http.upstream_rq_total") == discovery  # cached
    receipts = [receipt_of(r) for r in responses]
    assert all(r is not None and r.verified and r.invoice_id == "" for r in receipts)
    lines = decisions_of(gw, wallet.public_key, 11)
    assert [d["reason"] for d in lines] == ["paid"] * 11  # no 402 at all
    assert all(d["invoice_id"] is None for d in lines)
    assert await gw.balance(wallet.public_key) == 10_000_000 - 11 * 500


@grpc_only_prices  # the price changes between the price list and Envoy's annotation
async def test_direct_mode_falls_back_to_the_challenge_when_the_price_changed(
    repriced: Stack,
) -> None:
    wallet = await funded(repriced, "1", max_amount="0.05")
    sent = Sent()
    auth = X402Auth(wallet, strict=True)
    with httpx.Client(base_url=repriced.url, auth=auth, event_hooks=sent.hooks) as client:
        response = await asyncio.to_thread(client.get, "/api/v1/trade/verify/P-1")
    assert response.status_code == 200
    receipt = receipt_of(response)
    assert receipt is not None and receipt.verified
    assert (receipt.amount, receipt.invoice_id.startswith("inv_")) == ("0.02", True)
    path = "/api/v1/trade/verify/P-1"
    assert sent.requests == [
        ("GET", "/.well-known/x402", False),  # the price list says 0.01
        ("GET", path, True),  # direct proof at 0.01 → 402 invoice_mismatch
        ("GET", "/.well-known/x402", False),  # refreshed
        ("GET", path, True),  # the challenge's invoice, at 0.02
    ]
    decisions_of(repriced, wallet.public_key, 1)  # the refusal names no payer: by path
    lines = [d for d in repriced.decisions() if d["path"] == path]
    assert [(d["reason"], d["price"]) for d in lines] == [
        ("invoice_mismatch", "0.02"), ("paid", "0.02"),
    ]  # fmt: skip
    # Paid once, at the new price; the refused direct proof cost nothing.
    assert await repriced.balance(wallet.public_key) == 1_000_000 - 20_000
    assert wallet.spent() == "0.02"


# -- receipts ------------------------------------------------------------------------------


async def test_an_invalid_receipt_is_an_error_in_strict_mode_and_a_warning_otherwise(
    gw: Stack,
) -> None:
    wallet = await funded(gw)
    impostor = Identity.generate()  # pin a key that did not sign the gateway's receipts
    pinned = {impostor.kid: impostor.public_key}
    strict = X402Auth(wallet, strict=True, gateway_keys=pinned)
    async with httpx.AsyncClient(base_url=gw.url, auth=strict) as client:
        with pytest.raises(InvalidReceipt, match="signature") as raised:
            await client.get(ATLAS)
    # Raised after the money moved: it carries the paid answer and its receipt.
    error = raised.value
    assert isinstance(error.response, httpx.Response) and error.response.status_code == 200
    assert error.response.json()["path"] == ATLAS
    assert error.receipt is not None and error.receipt.receipt_id and not error.receipt.verified
    assert "pinned keys" in error.reason and "published" not in error.reason
    lenient = X402Auth(wallet, gateway_keys=pinned)
    async with httpx.AsyncClient(base_url=gw.url, auth=lenient) as client:
        with pytest.warns(ReceiptWarning, match="pinned keys") as warned:
            response = await client.get(ATLAS)
    assert [w.filename for w in warned] == [__file__]  # the caller's line, not the SDK's
    receipt = receipt_of(response)
    assert response.status_code == 200 and receipt is not None and not receipt.verified
    assert "does not verify against the pinned keys" in receipt.problem
    # The gateway did charge both times: an unverifiable receipt still counts as spent.
    assert wallet.spent() == "0.5"
    assert await gw.balance(wallet.public_key) == 9_500_000


# -- requests ------------------------------------------------------------------------------


async def test_the_requests_adapter_pays_and_exposes_the_receipt(gw: Stack) -> None:
    wallet = await funded(gw, "10", max_amount="5")

    def agent() -> list[requests.Response]:
        with x402_session(wallet) as session:
            direct = session.get(f"{gw.url}{ATLAS}", params={"q": "1"})
        with requests.Session() as session:
            session.mount("http://", X402Adapter(X402Auth(wallet, direct=False, strict=True)))
            challenged = session.post(
                f"{gw.url}/api/v1/agent/pay-api/atlas/deep", json={"topic": "agents"}
            )
        return [direct, challenged]

    direct, challenged = await asyncio.to_thread(agent)
    for response, amount in ((direct, "0.25"), (challenged, "5")):
        assert response.status_code == 200
        receipt = receipt_of(response)
        assert receipt is not None and receipt.verified and receipt.amount == amount
    assert [r.status_code for r in challenged.history] == [402, 200]  # 402, discovery
    assert challenged.json()["method"] == "POST"
    assert await gw.balance(wallet.public_key) == 10_000_000 - 5_250_000
    assert wallet.spent() == "5.25"


# -- reading challenges --------------------------------------------------------------------


async def test_the_invoice_is_read_from_the_payment_required_header_too(gw: Stack) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as plain:
        challenge = await plain.get(ATLAS)
    from_body = parse_invoice(challenge)
    header_only = httpx.Response(
        402, headers={"payment-required": challenge.headers["payment-required"]}
    )
    assert from_body is not None and parse_invoice(header_only) == from_body
    assert from_body.amount == "0.25" and str(from_body.invoice_id).startswith("inv_")
    assert parse_invoice(httpx.Response(402, text="pay me")) is None  # not x402: untouched
    with pytest.raises(InvalidChallenge, match="not base64"):
        parse_invoice(httpx.Response(402, headers={"payment-required": "%%%"}))


async def test_an_invoice_for_another_resource_is_not_paid(gw: Stack) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as plain:
        atlas_challenge = await plain.get(ATLAS)
    wallet = await funded(gw)
    flow = X402Auth(wallet, direct=False).auth_flow(
        httpx.Request("GET", f"{gw.url}/api/v1/trade/verify/T-9")
    )
    request = next(flow)
    assert "x-payment" not in request.headers
    with pytest.raises(InvalidChallenge, match="not paying"):
        flow.send(atlas_challenge)  # a 402 that asks to pay for a different resource
    assert wallet.spent() == "0"
