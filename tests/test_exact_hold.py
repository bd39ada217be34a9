"""x402 `exact` after success (x402's standard flow) through the real stack: anvil +
Circle's FiatTokenV2_2, `x402 facilitator serve`, real Envoy (ext_authz + ext_proc), the
sidecar, Redis and the demo upstream; paid by the unmodified official x402 Python client.
On a `charge: on_success` route the authorization is verified at the check and settled
only once the service succeeded; on an `on_check` route it is settled upfront. Nothing is
mocked."""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header

from sidecar.core import phases, protocol
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.authz.check import CheckService, Facts
from sidecar.server.config import Settings
from sidecar.server.logs import DecisionLog
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    facilitator_account,
    official_client,
    operator,
    payers,
)
from sidecar.tools.stack import Stack
from tests.support.exact import answer_lost, b64json, balances, sign_exact

REPORT, UPFRONT, ROWS = "/api/v1/report", "/api/paid", "/api/v1/data/rows"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
ROWS_MAX = 100 * 1_000  # the metered route's hold: 100 rows at 0.001
MARKER = "demo-upstream"  # in every body the demo service answers
ROUTES: dict[str, dict[str, Any]] = {
    "report": {"method": "GET", "path": REPORT, "price": "0.01", "charge": "on_success"},
    "paid": {"method": "GET", "path": UPFRONT, "price": "0.01"},
    "rows": {"method": "GET", "path": ROWS, "unit": "row", "unit_price": "0.001", "max_units": 100},
}


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    with Stack(ROUTES, settings=exact_settings(chain, facilitator)) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


def settles(chain: AnvilChain) -> int:
    """Transactions the facilitator has sent: one per settlement."""
    return chain.transaction_count(facilitator_account(chain).address)


def nonce_used(chain: AnvilChain, payer: str, nonce: str) -> bool:
    return chain.authorization_used(payer, bytes.fromhex(nonce.removeprefix("0x")))


def keys(stack: Stack) -> dict[str, str]:
    return {stack.gateway_identity.kid: stack.gateway_identity.public_key}


async def held(stack: Stack, payer: str) -> dict[str, Any]:
    """The check's decision line once the hold is placed (the service is then working)."""
    [line] = await asyncio.to_thread(
        stack.wait_decisions,
        lambda e: e.get("reason") == "held" and e.get("payer") == payer.lower(),
        1,
        20.0,
    )
    return line


async def test_a_failed_service_transfers_nothing_and_the_authorization_pays_later(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    payer = payers(chain)[0]
    header, payload = await sign_exact(chain, http, REPORT, payer, PRICE)
    nonce = payload.payload["authorization"]["nonce"]
    before, sent = balances(chain, payer.address), settles(chain)

    failed = await http.get(REPORT, params={"fail": "500"}, headers={"PAYMENT-SIGNATURE": header})

    assert failed.status_code == 500
    assert failed.json()["error"] == "demo_failure"  # the service's own answer
    refund = b64json(failed.headers["x-payment-response"])
    assert protocol.verify_receipt(refund, keys(stack))
    unsettled = decode_payment_response_header(failed.headers["payment-response"])
    assert (unsettled.success, unsettled.error_reason, unsettled.transaction) == (
        False,
        "service_failed",
        "",
    )
    assert unsettled.amount is None and unsettled.payer == payer.address
    assert (refund["success"], refund["scheme"], refund["amount"]) == (False, "exact", "0")
    assert (refund["released"], refund["status"], refund["transaction"]) == ("0.01", 500, "")
    assert refund["payer"] == payer.address
    # Nothing on chain: no transaction, balances as they were, the authorization unused.
    assert balances(chain, payer.address) == before and settles(chain) == sent
    assert not nonce_used(chain, payer.address, nonce)
    check, response = await asyncio.to_thread(
        stack.wait_decisions, lambda e: e.get("receipt_id") == refund["receipt_id"], 2
    )
    assert (check["phase"], check["reason"], check["payer"]) == (
        "check",
        "held",
        payer.address.lower(),
    )
    assert (response["phase"], response["decision"], response["reason"]) == (
        "response",
        "release",
        "service_failed",
    )
    assert (response["captured"], response["released"], response["upstream_status"]) == (
        "0",
        "0.01",
        500,
    )

    # The service healthy again: the very same authorization pays, once.
    served = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})

    assert served.status_code == 200, served.text
    assert served.json()["service"] == MARKER
    assert served.json()["payer"] == payer.address
    receipt = b64json(served.headers["x-payment-response"])
    assert protocol.verify_receipt(receipt, keys(stack))
    assert (receipt["success"], receipt["scheme"], receipt["amount"]) == (True, "exact", "0.01")
    settled = b64json(served.headers["payment-response"])
    assert (settled["amount"], settled["asset"]) == (str(PRICE), chain.token)
    assert settled["transaction"] == receipt["transaction"]
    assert receipt["network"] == chain.network and receipt["payer"] == payer.address
    tx = chain.w3.eth.get_transaction_receipt(receipt["transaction"])
    assert tx["status"] == 1
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert settles(chain) == sent + 1 and nonce_used(chain, payer.address, nonce)
    lines = await asyncio.to_thread(
        stack.wait_decisions, lambda e: e.get("receipt_id") == receipt["receipt_id"], 2
    )
    capture = next(line for line in lines if line.get("phase") == "response")
    assert (capture["decision"], capture["reason"], capture["captured"]) == (
        "capture",
        "captured",
        "0.01",
    )
    assert (capture["transaction"], capture["settled_via"]) == (
        receipt["transaction"],
        "facilitator",
    )
    assert all("signature" not in json.dumps(line) for line in stack.decisions())
    # Revenue is counted at the settle, on the route charged on success.
    page = (await http.get(f"{stack.sideport_url}/metrics")).text
    revenue = [
        line
        for line in page.splitlines()
        if line.startswith("x402_revenue_atomic_total") and 'route="report"' in line
    ]
    assert revenue and revenue[0].endswith(f" {float(PRICE)}")

    # A replay is answered with the recorded response (docs/protocol.md §13), up to the
    # redelivery limit, then refused: never before the facilitator, nothing more moves.
    for _ in range(DEFAULT_REDELIVERY_LIMIT):
        again = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
        assert (again.status_code, again.content) == (200, served.content)
    again = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert (again.status_code, again.json()["error"]) == (402, "nonce_reused")
    assert settles(chain) == sent + 1


async def test_the_official_client_pays_after_success_and_accepts_the_receipt(
    stack: Stack, chain: AnvilChain
) -> None:
    payer = payers(chain)[1]
    before, sent = balances(chain, payer.address), settles(chain)
    async with x402HttpxClient(official_client(chain, payer, PRICE), timeout=60) as client:
        response = await client.get(stack.url + REPORT)
    assert response.status_code == 200, response.text
    assert response.json()["service"] == MARKER
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert settled.success is True
    assert settled.network == chain.network and settled.payer == payer.address
    assert settled.amount == str(PRICE)
    tx = chain.w3.eth.get_transaction_receipt(settled.transaction)  # type: ignore[arg-type]
    assert tx["status"] == 1
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert settles(chain) == sent + 1
    receipt = b64json(response.headers["x-payment-response"])
    assert protocol.verify_receipt(receipt, keys(stack))
    assert (receipt["resource"], receipt["held"]) == (f"GET {REPORT}", "0.01")


async def test_funds_gone_before_the_settle_withhold_the_response(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    """Verified at the check; the payer empties its wallet while the service works: the
    settle fails, the service's answer is not served, nothing is transferred to us."""
    payer, elsewhere = payers(chain)[2], payers(chain)[5]
    header, payload = await sign_exact(chain, http, REPORT, payer, PRICE)
    nonce = payload.payload["authorization"]["nonce"]
    operator_before = chain.balance_of(operator(chain).address)

    pending = asyncio.create_task(
        http.get(REPORT, params={"sleep": "3"}, headers={"PAYMENT-SIGNATURE": header})
    )
    await held(stack, payer.address)
    everything = chain.balance_of(payer.address)
    await asyncio.to_thread(chain.transfer, payer.address, elsewhere.address, everything)
    response = await pending

    assert response.status_code == 402, response.text
    assert response.json()["error"] == "settlement_failed"
    assert MARKER not in response.text and "x-payment-response" not in response.headers
    # The standard's answer to a failed settlement: PAYMENT-RESPONSE, success false, why.
    failed = decode_payment_response_header(response.headers["payment-response"])
    assert (failed.success, failed.transaction, failed.network) == (False, "", chain.network)
    assert failed.error_reason and failed.payer == payer.address and failed.amount is None
    # A fresh challenge, as at the check: the agent may pay again (once funded).
    required = b64json(response.headers["payment-required"])
    assert [offer["scheme"] for offer in required["accepts"]] == [
        "prepaid-ed25519",
        "exact",
        "upto",  # tests/test_upto.py
    ]
    assert required["accepts"][1]["amount"] == str(PRICE)
    assert "paymentFlow" not in required["accepts"][1]["extra"]  # authorization: the default
    assert required["resource"]["url"].endswith(REPORT)
    assert response.json()["x402"]["charge"] == "on_success"
    assert chain.balance_of(operator(chain).address) == operator_before
    assert not nonce_used(chain, payer.address, nonce)
    [line] = await asyncio.to_thread(
        stack.wait_decisions,
        lambda e: e.get("phase") == "response" and e.get("payer") == payer.address.lower(),
    )
    assert (line["decision"], line["status"], line["reason"]) == ("deny", 402, "settlement_failed")
    await asyncio.to_thread(chain.transfer, elsewhere.address, payer.address, everything)


async def test_a_dead_facilitator_at_the_response_is_503_and_the_authorization_pays_later(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    payer = payers(chain)[3]
    header, payload = await sign_exact(chain, http, REPORT, payer, PRICE)
    nonce = payload.payload["authorization"]["nonce"]
    before, sent = balances(chain, payer.address), settles(chain)

    pending = asyncio.create_task(
        http.get(REPORT, params={"sleep": "2"}, headers={"PAYMENT-SIGNATURE": header})
    )
    await held(stack, payer.address)
    facilitator.kill()  # between the verify and the settle
    try:
        response = await pending
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "facilitator_unavailable"
        assert MARKER not in response.text and "payment-response" not in response.headers
        assert balances(chain, payer.address) == before and settles(chain) == sent
        assert not nonce_used(chain, payer.address, nonce)
    finally:
        facilitator.start()
    # The settle never reached the facilitator: the reservation was freed, it pays now.
    served = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200, served.text
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert settles(chain) == sent + 1


async def test_a_retry_of_a_payment_settled_at_the_response_gets_the_same_response(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    """The same authorization sent again after its settle at the response (its answer
    lost): answered with the recorded response and receipt, nothing verified or settled
    again, the service not run again (docs/protocol.md §13)."""
    payer = payers(chain)[5]
    header, _ = await sign_exact(chain, http, REPORT, payer, PRICE)
    first = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 200, first.text
    sent = settles(chain)

    again = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})

    assert again.status_code == 200, again.text
    assert again.content == first.content
    receipt = b64json(again.headers["x-payment-response"])
    assert receipt["receipt_id"] == b64json(first.headers["x-payment-response"])["receipt_id"]
    assert protocol.verify_receipt(receipt, keys(stack))
    assert again.headers["payment-response"] == first.headers["payment-response"]
    assert settles(chain) == sent
    rid = receipt["receipt_id"]
    seen = [e for e in stack.upstream_requests() if e["headers"].get("x-x402-receipt-id") == rid]
    assert len(seen) == 1
    [line] = await asyncio.to_thread(
        stack.wait_decisions, lambda e: e.get("reason") == "replayed" and e.get("receipt_id") == rid
    )
    assert line["payer"] == payer.address.lower()


async def test_an_on_check_route_still_settles_upfront(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    payer = payers(chain)[4]
    header, _ = await sign_exact(chain, http, UPFRONT, payer, PRICE)
    before = balances(chain, payer.address)
    failed = await http.get(UPFRONT, params={"fail": "500"}, headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500  # settled before the service was asked
    receipt = b64json(failed.headers["x-payment-response"])
    assert (receipt["success"], receipt["amount"]) == (True, "0.01")
    assert b64json(failed.headers["payment-response"])["amount"] == str(PRICE)
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


async def test_a_metered_route_refuses_exact_before_the_facilitator(
    http: httpx.AsyncClient, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    challenge = await http.get(ROWS)
    assert challenge.status_code == 402
    offers = b64json(challenge.headers["payment-required"])["accepts"]
    assert [offer["scheme"] for offer in offers] == ["prepaid-ed25519", "upto"]  # no exact
    # An authorization for the route's hold, signed anyway: refused, nothing verified.
    header, _ = await sign_exact(chain, http, REPORT, payers(chain)[4], ROWS_MAX, ROWS_MAX)
    log = (facilitator.workdir / "facilitator.log").read_text()
    response = await http.get(ROWS, headers={"PAYMENT-SIGNATURE": header})
    assert (response.status_code, response.json()["error"]) == (400, "unsupported_scheme")
    assert (facilitator.workdir / "facilitator.log").read_text() == log


async def test_timings_exact_after_success_versus_upfront(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    """Not a benchmark, nothing asserted on the numbers: p50 in this run, for the record."""
    payer = payers(chain)[4]
    upfront_ms: list[float] = []
    on_success_ms: list[float] = []
    for _ in range(10):
        for path, times in ((UPFRONT, upfront_ms), (REPORT, on_success_ms)):
            header, _ = await sign_exact(chain, http, path, payer, PRICE)
            start = time.perf_counter()
            answer = await http.get(path, headers={"PAYMENT-SIGNATURE": header})
            times.append((time.perf_counter() - start) * 1000)
            assert answer.status_code == 200, answer.text
    print(
        "\np50 over 10 exact payments through Envoy: "
        f"upfront (on_check) {statistics.median(upfront_ms):.1f} ms, "
        f"after success (on_success) {statistics.median(on_success_ms):.1f} ms"
    )


async def test_a_settle_answer_lost_after_success_is_resolved_on_chain(
    chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    """The facilitator sends the transfer but its /settle answer comes too late (anvil
    mines nothing until told): the sidecar looks the authorization up on chain, finds it
    used once mined, and serves the response as settled."""
    settings = exact_settings(chain, facilitator, facilitator_settle_timeout_ms=1000)
    payer = payers(chain)[0]
    with Stack(ROUTES, settings=settings) as slow:
        async with httpx.AsyncClient(base_url=slow.url, timeout=60) as http:
            header, payload = await sign_exact(chain, http, REPORT, payer, PRICE)
            nonce = payload.payload["authorization"]["nonce"]
            before, sent = balances(chain, payer.address), settles(chain)
            served = await answer_lost(
                chain, http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
            )
        assert served.status_code == 200, served.text
        assert served.json()["service"] == MARKER
        receipt = b64json(served.headers["x-payment-response"])
        assert receipt["success"] is True and nonce_used(chain, payer.address, nonce)
        assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
        assert settles(chain) == sent + 1
        [line] = await asyncio.to_thread(
            slow.wait_decisions,
            lambda e: e.get("phase") == "response" and e.get("decision") == "capture",
        )
        assert (line["settled_via"], line["transaction"]) == ("chain", receipt["transaction"])


async def test_a_check_envoy_left_after_the_verify_frees_the_authorization(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    """The real servicer in process, told Envoy is gone (as the HTTP transport is when
    Envoy hangs up; gRPC cancels instead) once the facilitator verified: no response phase
    will settle it, so the reservation is freed at once, the line says why, and the same
    authorization pays through the stack."""
    settings = Settings.load(stack.config_path, env={})
    ledger = Ledger.from_url(stack.redis_url)
    settler = wiring.exact_settler(settings, ledger)
    log = io.StringIO()
    servicer = CheckService(
        settings.route_table(), settings.gateway(), ledger, decisions=DecisionLog(stream=log),
        settler=settler,
    )  # fmt: skip
    payer = payers(chain)[0]
    header, _ = await sign_exact(chain, http, REPORT, payer, PRICE)
    facts = Facts(
        "GET", REPORT, "gateway.test", "http", {"payment-signature": header},
        {phases.EXT_PHASE: phases.PHASE_RESPONSE}, "127.0.0.1", gone=lambda: True,
    )  # fmt: skip

    await servicer.decide(facts)
    servicer.decisions.flush()

    [line] = [json.loads(text) for text in log.getvalue().splitlines()]
    assert (line["decision"], line["reason"], line["cancelled"]) == (
        "deny",
        "facilitator_unavailable",
        True,
    )
    paid = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert paid.status_code == 200, paid.text
    assert settler is not None
    await settler.close()
    await ledger.close()
