"""Holds through the real stack (Envoy's ext_authz + ext_proc, the sidecar, Redis, the demo
upstream): charged on success, metered, refunds on failure, and holds that never leak."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from sidecar.core import phases, protocol
from sidecar.core.errors import MaxAmountExceeded
from sidecar.ledger import scripts
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import Holds
from sidecar.server.authz.check import CheckService
from sidecar.server.config import Settings
from sidecar.server.envoy import phase_call
from sidecar.server.logs import DecisionLog
from sidecar.tools.stack import Stack
from tests.support.cli import x402
from tests.support.inprocess import cancel_while_redis_stalls, check_request
from tests.support.payers import funded_payer, pay_direct
from tests.support.settlement import settle

REPORT, ROWS, LLM = "/api/v1/report", "/api/v1/data/rows", "/api/v1/llm/generate"
ROUTES: dict[str, dict[str, Any]] = {
    "report": {"method": "GET", "path": REPORT, "price": "0.25", "charge": "on_success"},
    "rows": {
        "method": "GET",
        "path": ROWS,
        "unit": "row",
        "unit_price": "0.001",
        "max_units": 100,
        "description": "rows of data, 0.001 each",
    },
    "llm": {
        "method": "POST",
        "path": LLM,
        "unit": "token",
        "unit_price": "0.00001",
        "max_units": 4000,
        "min_units": 10,
        "usage_missing": "minimum",
    },
    "strict": {
        "method": "GET",
        "path": "/api/v1/strict",
        "price": "0.05",
        "charge": "on_success",
        "failure_status": 400,
    },
    "upfront": {"method": "GET", "path": "/api/v1/upfront", "price": "0.01"},
}


@pytest.fixture(scope="module")
def holds_stack() -> Iterator[Stack]:
    with Stack(ROUTES, settings={"hold_sweep_seconds": 1}) as running:
        yield running


@pytest.fixture(scope="module")
async def holds_ledger(holds_stack: Stack) -> AsyncIterator[Ledger]:
    client = Ledger.from_url(holds_stack.redis_url)
    yield client
    await client.close()


@pytest.fixture
async def http(holds_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=holds_stack.url, timeout=15) as client:
        yield client


def receipt_of(response: httpx.Response) -> dict[str, Any]:
    receipt: dict[str, Any] = json.loads(base64.b64decode(response.headers["payment-response"]))
    assert json.loads(base64.b64decode(response.headers["x-payment-response"])) == receipt
    return receipt


async def keys(client: httpx.AsyncClient) -> dict[str, str]:
    doc = (await client.get("/.well-known/x402")).json()
    return {key["kid"]: key["public_key"] for key in doc["keys"]}


async def test_the_phase_port_answers_checks_only_over_the_http_transport(
    holds_stack: Stack,
) -> None:
    """A held route's response phase comes to the workers' HTTP port whichever the
    transport; over gRPC that port answers the phase's calls alone: anything else is a
    404, never a check's allow."""
    port = holds_stack.ports["authz_http"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as raw:
        asked = await raw.get(REPORT)
    if holds_stack.transport == "grpc":
        assert asked.status_code == 404 and asked.json()["error"] == "not_found"
    else:  # a check without a proof: the route's price, never a pass
        assert asked.status_code == 402


async def test_a_failed_service_charges_nothing_and_the_same_proof_pays_later(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    proof = pay_direct(holds_stack, wallet, f"GET {REPORT}", "0.25")

    failed = await http.get(REPORT, params={"fail": "500"}, headers=proof)

    assert failed.status_code == 500
    assert failed.json()["error"] == "demo_failure"  # the service's own answer
    refund = receipt_of(failed)
    assert refund["success"] is False
    assert (refund["amount"], refund["released"], refund["balance"]) == ("0", "0.25", "1")
    assert protocol.verify_receipt(refund, await keys(http))
    account = await holds_ledger.account(wallet.public_key)
    assert account.balances["USDF"] == 1_000_000 and account.held == {}
    assert account.debited.get("USDF", 0) == 0
    assert await holds_ledger.receipts(wallet.public_key) == []

    served = await http.get(REPORT, headers=proof)  # the very same proof, service healthy

    assert served.status_code == 200
    assert served.json()["amount"] == "0.25"
    receipt = receipt_of(served)
    assert receipt["success"] is True
    assert (receipt["amount"], receipt["balance"], receipt["held"]) == ("0.25", "0.75", "0.25")
    assert protocol.verify_receipt(receipt, await keys(http))
    account = await holds_ledger.account(wallet.public_key)
    assert account.balances["USDF"] == 750_000 and account.debited["USDF"] == 250_000
    [stored] = await holds_ledger.receipts(wallet.public_key)
    assert (stored["receipt_id"], stored["amount"]) == (receipt["receipt_id"], "250000")

    # Its answer lost, the agent retries: served again with the receipt that charged it,
    # nothing charged (protocol.md §13).
    again = await http.get(REPORT, headers=proof)
    assert again.status_code == 200
    assert again.headers["payment-response"] == served.headers["payment-response"]
    assert (await holds_ledger.account(wallet.public_key)).balances["USDF"] == 750_000


async def test_a_metered_route_charges_the_rows_served(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    challenge = await http.get(ROWS, params={"limit": "37"})
    assert challenge.status_code == 402
    invoice = challenge.json()["x402"]
    assert invoice["amount"] == "0.1"  # the hold: the quoted maximum, 100 rows
    assert (invoice["unit"], invoice["unit_price"], invoice["max_units"]) == (
        "row",
        "0.001",
        "100",
    )

    served = await http.get(
        ROWS, params={"limit": "37"}, headers=pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    )

    assert served.status_code == 200
    assert len(served.json()["rows"]) == 37
    assert "x402-usage" not in served.headers  # stripped before the client sees it
    receipt = receipt_of(served)
    assert (receipt["amount"], receipt["held"], receipt["units"]) == ("0.037", "0.1", 37)
    assert receipt["balance"] == "0.963"
    account = await holds_ledger.account(wallet.public_key)
    assert account.balances["USDF"] == 1_000_000 - 37_000
    assert account.debited["USDF"] == 37_000 and account.held == {}
    [stored] = await holds_ledger.receipts(wallet.public_key)
    assert (stored["amount"], stored["units"], stored["held"]) == ("37000", "37", "100000")
    # the decision log: the check placed the hold, the response captured part of it
    hold_id = receipt["receipt_id"]
    check, response = holds_stack.wait_decisions(lambda e: e.get("receipt_id") == hold_id, 2)
    assert (check["phase"], check["reason"], check["price"]) == ("check", "held", "0.1")
    assert (response["phase"], response["decision"], response["captured"]) == (
        "response",
        "capture",
        "0.037",
    )
    assert (response["released"], response["units"], response["upstream_status"]) == (
        "0.063",
        37,
        200,
    )


async def test_more_usage_than_the_hold_captures_the_hold(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    proof = pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    served = await http.get(ROWS, params={"limit": "500"}, headers=proof)
    assert served.status_code == 200
    assert (receipt_of(served)["amount"], receipt_of(served)["units"]) == ("0.1", 100)


async def test_missing_or_malformed_usage_follows_the_routes_rule(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    # rows: usage_missing defaults to "hold": a malformed report captures the hold
    proof = pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    served = await http.get(ROWS, params={"usage": "12 rows"}, headers=proof)
    assert served.status_code == 200
    assert receipt_of(served)["amount"] == "0.1"
    # llm: usage_missing "minimum" (10 tokens); a prompt of 120 max_tokens reports 120
    proof = pay_direct(holds_stack, wallet, f"POST {LLM}", "0.04")
    served = await http.post(LLM, json={"prompt": "hi", "max_tokens": 120}, headers=proof)
    assert served.status_code == 200
    assert (receipt_of(served)["amount"], receipt_of(served)["units"]) == ("0.0012", 120)
    proof = pay_direct(holds_stack, wallet, f"POST {LLM}", "0.04")
    served = await http.post(LLM, params={"usage": "-5"}, json={"max_tokens": 9}, headers=proof)
    assert (receipt_of(served)["amount"], receipt_of(served)["units"]) == ("0.0001", 10)
    account = await holds_ledger.account(wallet.public_key)
    assert account.debited["USDF"] == 100_000 + 1_200 + 100
    assert account.balances["USDF"] == 1_000_000 - account.debited["USDF"]


async def test_the_failure_threshold_is_per_route(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    proof = pay_direct(holds_stack, wallet, "GET /api/v1/strict", "0.05")
    missing = await http.get("/api/v1/strict", params={"fail": "404"}, headers=proof)
    assert missing.status_code == 404
    assert receipt_of(missing)["success"] is False
    # on the default route a 404 is served, so it is paid
    proof = pay_direct(holds_stack, wallet, f"GET {REPORT}", "0.25")
    paid = await http.get(REPORT, params={"fail": "404"}, headers=proof)
    assert paid.status_code == 404
    assert receipt_of(paid)["amount"] == "0.25"
    assert (await holds_ledger.account(wallet.public_key)).balances["USDF"] == 750_000
    # revenue is counted at the capture, never at the hold
    page = (await http.get(f"{holds_stack.sideport_url}/metrics")).text
    assert (
        'x402_decisions_total{decision="release",reason="service_failed",route="strict"} 1.0'
        in page
    )
    assert 'x402_decisions_total{decision="allow",reason="held",route="strict"} 1.0' in page
    assert 'route="strict"' not in "".join(
        line for line in page.splitlines() if line.startswith("x402_revenue_atomic_total")
    )


async def test_an_on_check_route_still_charges_at_the_check(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    wallet = await funded_payer(holds_ledger, 1_000_000)
    proof = pay_direct(holds_stack, wallet, "GET /api/v1/upfront", "0.01")
    failed = await http.get("/api/v1/upfront", params={"fail": "500"}, headers=proof)
    assert failed.status_code == 500
    assert receipt_of(failed)["amount"] == "0.01"  # charged before the service answered
    assert (await holds_ledger.account(wallet.public_key)).balances["USDF"] == 990_000


async def test_discovery_describes_metered_and_on_success_routes(
    http: httpx.AsyncClient,
) -> None:
    routes = {r["path"]: r for r in (await http.get("/.well-known/x402")).json()["routes"]}
    assert routes[ROWS]["price"] == "0.1"
    assert (routes[ROWS]["unit"], routes[ROWS]["unit_price"], routes[ROWS]["max_units"]) == (
        "row",
        "0.001",
        "100",
    )
    assert routes[REPORT]["charge"] == "on_success"
    assert routes["/api/v1/upfront"].get("charge", "on_check") == "on_check"


# -- holds never leak ---------------------------------------------------------------------

SLOW = "/api/v1/slow"
HOLD_SECONDS = 4


@pytest.fixture(scope="module")
def fragile_stack() -> Iterator[Stack]:
    routes = {
        "slow": {
            "method": "GET",
            "path": SLOW,
            "price": "0.25",
            "charge": "on_success",
            "hold_seconds": HOLD_SECONDS,
        },
        "bulk": {  # answers past the edge's 32 KiB buffer: they stream after the headers
            "method": "GET",
            "path": ROWS,
            "price": "0.25",
            "charge": "on_success",
            "hold_seconds": HOLD_SECONDS,
        },
    }
    with Stack(routes, settings={"hold_sweep_seconds": 1}) as running:
        yield running


async def test_a_sidecar_killed_mid_request_leaves_no_charge_and_no_hold(
    fragile_stack: Stack,
) -> None:
    stack = fragile_stack
    ledger = Ledger.from_url(stack.redis_url)
    try:
        wallet = await funded_payer(ledger, 1_000_000)
        proof = pay_direct(stack, wallet, f"GET {SLOW}", "0.25")
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as http:
            pending = asyncio.create_task(http.get(SLOW, params={"sleep": "1.5"}, headers=proof))
            [held] = await asyncio.to_thread(
                stack.wait_decisions, lambda e: e.get("reason") == "held", 1, 10.0
            )
            account = await ledger.account(wallet.public_key)
            assert account.held == {"USDF": 250_000} and account.balances["USDF"] == 750_000
            # The sidecar dies between the check and the response: no one sees the response.
            os.killpg(stack.processes["sidecar"].popen.pid, signal.SIGKILL)
            stack.processes["sidecar"].popen.wait()
            lost = await pending
            assert lost.status_code == 503  # never the service's answer, never free
            # Envoy's own failure of the phase, typed (docs/protocol.md §5).
            assert lost.json()["error"] == "response_phase_unavailable"
            # (the phase's call found no sidecar: Envoy's own 503 for it, phase_call.py)
            assert lost.json()["details"] == phase_call.FAILED_DETAILS + "call_503"
            assert "payment-response" not in lost.headers
            stack.start_sidecar()  # back up, before the hold's lifetime ends

            # Within its lifetime (plus a sweep), the ledger released the hold by itself.
            holds = Holds(ledger)
            for _ in range(int((HOLD_SECONDS + 4) / 0.1)):
                account = await ledger.account(wallet.public_key)
                if not account.held:
                    break
                await asyncio.sleep(0.1)
            assert account.held == {} and account.balances["USDF"] == 1_000_000
            assert await holds.open_holds(wallet.public_key) == 0
            assert await ledger.receipts(wallet.public_key) == []

            served = await http.get(SLOW, headers=proof)  # the same proof works again
            assert served.status_code == 200
            assert receipt_of(served)["amount"] == "0.25"
            assert receipt_of(served)["receipt_id"] != held["receipt_id"]
        assert (await ledger.account(wallet.public_key)).balances["USDF"] == 750_000
    finally:
        await ledger.close()


async def test_a_refused_answer_too_long_to_read_first_is_never_served(
    fragile_stack: Stack,
) -> None:
    """An answer longer than the edge's buffer is not read before the phase's call: it
    streams after the headers. When the phase fails (the sidecar dies while the service
    works), the drop filter (server/envoy/phase_call.py) empties it on its way out: the
    typed 503, not one row of the service's answer."""
    stack = fragile_stack
    ledger = Ledger.from_url(stack.redis_url)
    try:
        wallet = await funded_payer(ledger, 1_000_000)
        proof = pay_direct(stack, wallet, f"GET {ROWS}", "0.25")
        query = {"limit": "4000", "sleep": "1.5"}  # ~100 KB of rows
        async with httpx.AsyncClient(base_url=stack.url, timeout=15) as http:
            pending = asyncio.create_task(http.get(ROWS, params=query, headers=proof))
            await asyncio.to_thread(
                stack.wait_decisions,
                lambda e: e.get("reason") == "held" and e.get("path") == ROWS,
                1,
                10.0,
            )
            os.killpg(stack.processes["sidecar"].popen.pid, signal.SIGKILL)
            stack.processes["sidecar"].popen.wait()
            lost = await pending
            stack.start_sidecar()
            assert lost.status_code == 503
            assert lost.json() == {
                "error": "response_phase_unavailable",
                "message": "the payment could not be completed; nothing was charged, retry shortly",
                "details": phase_call.FAILED_DETAILS + "call_503",
            }
            assert "payment-response" not in lost.headers
            # The phase answering, the same long answer is served whole (a new payment: the
            # first one's hold is still open until it expires).
            again = pay_direct(stack, wallet, f"GET {ROWS}", "0.25")
            served = await http.get(ROWS, params={"limit": "4000"}, headers=again)
            assert served.status_code == 200 and len(served.json()["rows"]) == 4000
            assert len(served.content) > 32768 and receipt_of(served)["amount"] == "0.25"
    finally:
        await ledger.close()


async def test_the_sdk_pays_the_hold_and_keeps_the_difference(
    holds_stack: Stack, holds_ledger: Ledger
) -> None:
    from sidecar.agent.auth import X402Auth, receipt_of
    from sidecar.agent.wallet import Wallet

    wallet = Wallet.generate(max_amount="0.1", budget="0.5")
    await holds_ledger.register(wallet.public_key)
    await holds_ledger.credit(wallet.public_key, "USDF", 1_000_000, "sdk-holds")
    auth = X402Auth(wallet, strict=True)
    async with httpx.AsyncClient(base_url=holds_stack.url, timeout=15, auth=auth) as http:
        served = await http.get(ROWS, params={"limit": "37"})
        receipt = receipt_of(served)
        assert served.status_code == 200 and receipt is not None and receipt.verified
        assert (receipt.amount, receipt.held, receipt.units) == ("0.037", "0.1", 37)
        assert wallet.spent() == "0.037"  # the guard saw the hold; the budget the capture
        assert wallet.remaining() == "0.463"

        failed = await http.get(ROWS, params={"fail": "503"})
        refund = receipt_of(failed)
        assert failed.status_code == 503 and refund is not None and refund.verified
        assert (refund.success, refund.amount, refund.held) == (False, "0", "0.1")
        assert wallet.spent() == "0.037"

        # the guards apply to the hold: 0.25 is above max_amount, so nothing is signed
        with pytest.raises(MaxAmountExceeded):
            await http.get(REPORT)
    assert (await holds_ledger.account(wallet.public_key)).balances["USDF"] == 1_000_000 - 37_000


async def test_captures_settle_into_evidence_with_the_captured_amounts(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger, tmp_path: Any
) -> None:

    wallet = await funded_payer(holds_ledger, 1_000_000)
    served = await http.get(
        ROWS, params={"limit": "12"}, headers=pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    )
    failed = await http.get(
        REPORT,
        params={"fail": "502"},
        headers=pay_direct(holds_stack, wallet, f"GET {REPORT}", "0.25"),
    )
    assert failed.status_code == 502 and receipt_of(failed)["success"] is False
    run = await settle(holds_stack, "--anchor-file", str(tmp_path / "anchors.jsonl"))
    assert run.code == 0, run.err
    out = tmp_path / "bundle.json"
    run = await x402(
        "evidence", "export", "--payer", wallet.public_key, "--out", str(out),
        "--config", str(holds_stack.config_path),
    )  # fmt: skip
    assert run.code == 0, run.err
    bundle = json.loads(out.read_text())
    # one receipt: the capture, exactly as the agent got it (0.012 of 0.1); no release
    assert [item["receipt"] for item in bundle["receipts"]] == [receipt_of(served)]
    assert bundle["receipts"][0]["receipt"]["amount"] == "0.012"
    run = await x402(
        "evidence", "verify", str(out), "--key", holds_stack.gateway_identity.public_key
    )
    assert run.code == 0, run.out


async def test_a_channel_voucher_on_a_metered_route_is_a_typed_refusal_not_a_503(
    holds_stack: Stack, holds_ledger: Ledger
) -> None:
    """A voucher cannot hold an amount until the response: the gateway says so with a
    4xx a client does not retry (it used to be 503 internal_error), and nothing moves."""
    from sidecar.agent.channel import ChannelAuth, PaymentChannel
    from sidecar.agent.wallet import Wallet
    from sidecar.ledger.channels import Channels

    wallet = Wallet.generate()
    await holds_ledger.register(wallet.public_key)
    await holds_ledger.credit(wallet.public_key, "USDF", 1_000_000, "sdk-channel-metered")
    channel_id, _ = await Channels(holds_ledger).open(
        wallet.public_key, "USDF", 500_000, holds_stack.gateway_identity.kid
    )
    channel = PaymentChannel(wallet, channel_id, deposit="0.5")
    async with httpx.AsyncClient(base_url=holds_stack.url, auth=ChannelAuth(channel)) as client:
        refused = await client.get(ROWS, params={"limit": "3"})
    assert refused.status_code == 400 and refused.json()["error"] == "unsupported_scheme"
    assert "metered" in refused.json()["message"]
    assert channel.cumulative == "0" and channel.deposit == "0.5"  # human amounts
    assert (await holds_ledger.account(wallet.public_key)).balances["USDF"] == 500_000


async def test_a_hold_placed_after_envoy_gave_up_gets_its_line_and_stays_until_it_expires(
    holds_stack: Stack, holds_ledger: Ledger
) -> None:
    """The real servicer in process; Redis paused (DEBUG SLEEP) while the hold script is in
    it, the check cancelled as Envoy's timeout would: the hold is placed all the same, its
    line says `held` and `cancelled`, and it stays (no response phase will close it: the
    sweep gives it back when it expires)."""
    settings = Settings.load(holds_stack.config_path, env={})
    log = io.StringIO()
    servicer = CheckService(
        settings.route_table(),
        settings.gateway(),
        Ledger.from_url(holds_stack.redis_url, timeout=5),
        decisions=DecisionLog(stream=log),
    )
    wallet = await funded_payer(holds_ledger, 1_000_000)
    proof = {name.lower(): value for name, value in pay_direct(
        holds_stack, wallet, f"GET {REPORT}", "0.25"
    ).items()}  # fmt: skip
    check = check_request("GET", REPORT, proof, {phases.EXT_PHASE: phases.PHASE_RESPONSE})
    await cancel_while_redis_stalls(servicer, holds_ledger, scripts.HOLD, check)

    account = await holds_ledger.account(wallet.public_key)
    assert (account.balances["USDF"], account.held["USDF"]) == (750_000, 250_000)
    [line] = [json.loads(text) for text in log.getvalue().splitlines()]
    assert (line["decision"], line["reason"], line["cancelled"]) == ("allow", "held", True)
    assert line["phase"] == "check" and line["balance"] == "0.75"
    await servicer.ledger.close()


async def test_a_captured_holds_proof_sent_again_is_redelivered_uncharged(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    """The answer of a captured hold was lost: the same proof for the same request passes
    again with the capture's receipt and charges nothing, up to the limit (protocol.md
    §13); the service runs again (no response is replayed yet), its usage header
    stripped."""
    wallet = await funded_payer(holds_ledger, 1_000_000)
    headers = pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    served = await http.get(ROWS, params={"limit": "37"}, headers=headers)
    receipt = receipt_of(served)

    retries = [await http.get(ROWS, params={"limit": "37"}, headers=headers) for _ in range(3)]

    assert {r.headers["payment-response"] for r in retries} == {served.headers["payment-response"]}
    assert {r.json()["receipt_id"] for r in retries} == {receipt["receipt_id"]}  # the service's
    assert {len(r.json()["rows"]) for r in retries} == {37}
    assert not any("x402-usage" in r.headers for r in retries)  # stripped as for a capture
    past = await http.get(ROWS, params={"limit": "37"}, headers=headers)
    assert (past.status_code, past.json()["error"]) == (402, "nonce_reused")
    other = pay_direct(holds_stack, wallet, f"GET {ROWS}", "0.1")
    await http.get(ROWS, params={"limit": "5"}, headers=other)
    conflict = await http.get(ROWS, params={"limit": "6"}, headers=other)
    assert (conflict.status_code, conflict.json()["error"]) == (409, "payment_identifier_conflict")
    account = await holds_ledger.account(wallet.public_key)
    assert account.debited["USDF"] == 37_000 + 5_000 and account.held == {}
    assert len(await holds_ledger.receipts(wallet.public_key)) == 2


async def test_held_requests_leave_no_key_without_an_expiry_per_request(
    http: httpx.AsyncClient, holds_stack: Stack, holds_ledger: Ledger
) -> None:
    """Memory is bounded by expiry: after a payer's first held request, more of them (each
    captured or released) add no key without a TTL; what they leave per request (the
    spent nonce, the recorded outcome) expires. The receipts stream aside: settlement
    trims it."""
    wallet = await funded_payer(holds_ledger, 1_000_000)

    async def paid(fail: str | None = None) -> None:
        params = {"fail": fail} if fail else {}
        proof = pay_direct(holds_stack, wallet, f"GET {REPORT}", "0.25")
        answer = await http.get(REPORT, params=params, headers=proof)
        assert answer.status_code == (int(fail) if fail else 200)

    client = aioredis.from_url(holds_stack.redis_url)

    async def lasting() -> set[bytes]:
        keys = [key async for key in client.scan_iter(count=1000)]
        ttls = [await client.ttl(key) for key in keys]
        return {key for key, ttl in zip(keys, ttls, strict=True) if ttl == -1}

    try:
        await paid()
        before = await lasting()
        for fail in (None, "500", None):
            await paid(fail)
        assert await lasting() == before
    finally:
        await client.aclose()
