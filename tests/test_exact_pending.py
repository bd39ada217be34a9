"""`exact` when the facilitator settles and then fails to answer (it times out, a proxy
answers 502, it answers a 402 re-challenge): a hostile proxy in front of the real
facilitator (tests/support/hostile.py) on anvil with Circle's USDC, the real sidecar,
Envoy and Redis.

What must hold (issue #23): the gateway never settles twice and never serves free; an
outcome it cannot learn is `503 settlement_pending` (never `facilitator_unavailable`,
which means nothing happened, and never a fresh invoice); the same payment sent again is
served once the chain shows it; an agent following the answers never signs a second
payment."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sidecar.agent import EvmKey, Wallet, X402Auth
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, payers
from sidecar.tools.stack import Stack
from tests.support.exact import b64json, balances, sign_exact
from tests.support.hostile import HostileFacilitator, flaky_chain, hostile_facilitator

PAID, REPORT = "/api/paid", "/api/v1/report"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
ROUTES = {
    "paid": {"method": "GET", "path": PAID, "price": "0.01", "description": "paid"},
    "report": {"method": "GET", "path": REPORT, "price": "0.01", "charge": "on_success"},
}
MODES = ("timeout", "502", "402", "pending")


@pytest.fixture(scope="module")
def hostile(facilitator: FacilitatorProcess) -> Iterator[HostileFacilitator]:
    with hostile_facilitator(facilitator.url) as running:
        yield running


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess, hostile: HostileFacilitator
) -> Iterator[Stack]:  # fmt: skip
    settings = exact_settings(
        chain, facilitator, facilitator_settle_timeout_ms=1000, chain_lookup_ms=0
    )
    settings["facilitator_url"] = hostile.url
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("mode", MODES)
async def test_a_settle_whose_answer_is_lost_is_served_once_the_chain_shows_it(
    mode: str, http: httpx.AsyncClient, chain: AnvilChain, hostile: HostileFacilitator
) -> None:
    payer = payers(chain)[MODES.index(mode)]
    header, _ = await sign_exact(chain, http, PAID, payer, PRICE)
    before = balances(chain, payer.address)
    hostile.mode = mode
    response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200, response.text
    receipt = b64json(response.headers["payment-response"])
    assert receipt["success"] is True
    assert chain.w3.eth.get_transaction_receipt(receipt["transaction"])["status"] == 1
    # Sent once more (its answer lost again): redelivered with the same receipt (§13).
    again = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200, again.text
    assert again.headers["x-payment-response"] == response.headers["x-payment-response"]
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


async def test_an_unknown_outcome_at_the_response_is_resolved_when_the_same_payment_comes(
    http: httpx.AsyncClient, chain: AnvilChain, hostile: HostileFacilitator, stack: Stack
) -> None:
    """On a route charged on success the settle runs at the response: its unknown outcome
    withholds the response (503 settlement_pending); the same authorization sent again is
    resolved at the check (landed: it passes, settled, nothing settled again) and recorded,
    so a further retry is redelivered with the same receipt."""
    payer = payers(chain)[1]  # balances compared within the test: deltas
    header, _ = await sign_exact(chain, http, REPORT, payer, PRICE)
    before = balances(chain, payer.address)
    hostile.mode = "timeout"
    await asyncio.to_thread(chain.automine, False)
    try:
        pending = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    finally:
        await asyncio.to_thread(chain.mine)
        await asyncio.to_thread(chain.automine, True)
    assert (pending.status_code, pending.json()["error"]) == (503, "settlement_pending")
    assert "payment-required" not in pending.headers  # no new invoice: the same payment

    served = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200, served.text
    assert served.json()["service"] == "demo-upstream"
    receipt = b64json(served.headers["payment-response"])
    assert chain.w3.eth.get_transaction_receipt(receipt["transaction"])["status"] == 1
    again = await http.get(REPORT, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 200, again.text
    assert again.headers["x-payment-response"] == served.headers["x-payment-response"]
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


@pytest.mark.parametrize("mode", MODES)
async def test_an_unknown_outcome_is_settlement_pending_and_the_same_payment_is_served_later(
    mode: str, http: httpx.AsyncClient, chain: AnvilChain, hostile: HostileFacilitator,
    stack: Stack,
) -> None:  # fmt: skip
    payer = payers(chain)[(3 + MODES.index(mode)) % len(payers(chain))]
    header, _ = await sign_exact(chain, http, PAID, payer, PRICE)
    earlier = len(stack.decisions())
    before = balances(chain, payer.address)
    hostile.mode = mode
    await asyncio.to_thread(chain.automine, False)
    try:
        pending = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    finally:
        await asyncio.to_thread(chain.mine)
        await asyncio.to_thread(chain.automine, True)
    # The transfer was only in the pool: the gateway cannot know, and says so.
    assert pending.status_code == 503, pending.text
    body = pending.json()
    assert body["error"] == "settlement_pending"
    assert body["network"] == chain.network
    assert pending.headers["retry-after"] == "1"
    assert "x402" not in body and "payment-required" not in pending.headers  # no new invoice
    # The same payment, sent again once the block is mined: served, once.
    served = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200, served.text
    receipt = b64json(served.headers["payment-response"])
    assert chain.w3.eth.get_transaction_receipt(receipt["transaction"])["status"] == 1
    # Resolved from the chain and recorded: sent again, it is redelivered, not settled.
    replay = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert replay.status_code == 200, replay.text
    assert replay.headers["x-payment-response"] == served.headers["x-payment-response"]
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    await asyncio.sleep(0.2)  # decision lines are written after the answer
    lines = stack.decisions()[earlier:]
    reasons = [line["reason"] for line in lines if line.get("payer") == payer.address.lower()]
    assert reasons.count("exact") == 1 and "facilitator_unavailable" not in reasons
    assert reasons.count("redelivered") == 1


async def test_the_sdk_sends_the_same_payment_again_until_the_outcome_is_known(
    stack: Stack, chain: AnvilChain, hostile: HostileFacilitator
) -> None:
    """X402Auth (an EVM key only) meets 503 settlement_pending and re-sends the very same
    authorization after Retry-After: one signature, one transfer, served."""
    payer = payers(chain)[0]  # its balance moved by the first test only: deltas are per test
    wallet = Wallet(evm=EvmKey.from_text(payer.key), budget="1")
    before = balances(chain, payer.address)
    hostile.mode = "502"
    signatures: list[str] = []

    async def seen(request: httpx.Request) -> None:
        if "payment-signature" in request.headers:
            signatures.append(request.headers["payment-signature"])

    def mine_after_the_first_answer() -> None:
        for _ in range(200):
            if chain.pending_transactions():
                break
            threading.Event().wait(0.05)
        threading.Event().wait(1.5)  # past the settle timeout: the first answer was 503
        chain.mine()

    await asyncio.to_thread(chain.automine, False)
    miner = threading.Thread(target=mine_after_the_first_answer)
    miner.start()
    try:
        async with httpx.AsyncClient(
            auth=X402Auth(wallet), timeout=60, event_hooks={"request": [seen]}
        ) as client:
            response = await client.get(stack.url + PAID)
    finally:
        miner.join()
        await asyncio.to_thread(chain.automine, True)
    assert response.status_code == 200, response.text
    assert len(set(signatures)) == 1 and len(signatures) >= 2  # re-sent, never re-signed
    assert wallet.spent("USDF") == "0.01"
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


async def test_a_failed_chain_read_is_retried_within_the_lookup_window(
    chain: AnvilChain, facilitator: FacilitatorProcess, hostile: HostileFacilitator
) -> None:
    """The settle's answer is lost and the first two looks at the chain fail (a provider's
    502): the lookup tries again within chain_lookup_ms and serves the landed payment."""
    with flaky_chain(chain.rpc_url) as flaky:
        settings = exact_settings(
            chain, facilitator, facilitator_settle_timeout_ms=1000, chain_lookup_ms=3000
        )
        settings.update(facilitator_url=hostile.url, chain_rpc_url=flaky.url)
        with Stack(ROUTES, settings=settings) as lossy:
            async with httpx.AsyncClient(base_url=lossy.url, timeout=60) as http:
                payer = payers(chain)[5]
                header, _ = await sign_exact(chain, http, PAID, payer, PRICE)
                before = balances(chain, payer.address)
                hostile.mode, flaky.failures = "502", 2
                response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200, response.text
    assert flaky.failed == 2
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
