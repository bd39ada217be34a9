"""Self-serve top-ups through the real stack: an unmodified official x402 client buys
prepaid credit for a fresh Ed25519 key with `exact` (anvil + FiatTokenV2_2 + the official
facilitator), then the project's SDK spends it. Nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.agent.auth import X402Auth
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import SUSPENDED, Ledger
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
from tests.support.exact import answer_lost
from tests.support.payers import pay_direct

TOPUP = "/x402/topup"
CHEAP = "/api/cheap"
ROUTES = {"cheap": {"method": "GET", "path": CHEAP, "price": "0.001"}}  # sub-cent
USDC = 1_000_000


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    settings = exact_settings(chain, facilitator, topup_min="1", topup_max="50")
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.fixture
async def ledger(stack: Stack) -> AsyncIterator[Ledger]:
    client = Ledger.from_url(stack.redis_url)
    yield client
    await client.close()


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def onchain(chain: AnvilChain, address: str) -> tuple[int, int]:
    return chain.balance_of(address), chain.balance_of(operator(chain).address)


def topup_lines(stack: Stack, payer: str) -> list[dict[str, Any]]:
    lines = []
    for line in stack.processes["sidecar"].log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "topup.decision" and entry.get("payer") == payer:
            lines.append(entry)
    return lines


async def signed_topup(
    chain: AnvilChain, http: httpx.AsyncClient, key: str, amount: str, payer_index: int
) -> str:
    """The 402 of a top-up, paid the way the official client pays it: the header value."""
    challenge = await http.post(TOPUP, params={"payer": key, "amount": amount})
    assert challenge.status_code == 402, challenge.text
    required = PaymentRequired.model_validate(b64json(challenge.headers["payment-required"]))
    client = official_client(chain, payers(chain)[payer_index], 50 * USDC)
    payload = await client.create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    return base64.b64encode(payload.model_dump_json(by_alias=True).encode()).decode()


async def test_discovery_lists_the_topup_route(http: httpx.AsyncClient, chain: AnvilChain) -> None:
    doc = (await http.get("/.well-known/x402")).json()
    assert doc["topup"] == {
        "method": "POST",
        "path": TOPUP,
        "asset": "USDF",
        "min": "1",
        "max": "50",
    }
    assert "exact" in doc["schemes"]
    assert doc["onchain"][0]["token"] == chain.token
    assert doc["payment_target"] == operator(chain).address


async def test_the_topup_402_is_exact_for_the_amount(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    key = Identity.generate().public_key
    response = await http.post(TOPUP, params={"payer": key, "amount": "5"})
    assert response.status_code == 402
    required = PaymentRequired.model_validate(b64json(response.headers["payment-required"]))
    (offer,) = required.accepts
    assert (offer.scheme, offer.network, offer.amount) == ("exact", chain.network, "5000000")
    assert (offer.asset, offer.pay_to) == (chain.token, operator(chain).address)
    assert required.resource is not None and TOPUP in required.resource.url
    body = response.json()
    assert body["error"] == "payment_required"
    assert (body["x402"]["payer"], body["x402"]["amount"], body["x402"]["price_usd"]) == (
        key,
        "5",
        "5",
    )


async def test_an_official_client_buys_credit_the_sdk_spends_it(
    stack: Stack, chain: AnvilChain, ledger: Ledger
) -> None:
    """(b): a fresh key, no registration; an unmodified official client tops it up; the
    project's SDK pays 100 sub-cent requests from the credit."""
    wallet = Wallet.generate()
    key = wallet.public_key
    payer = payers(chain)[0]
    before = onchain(chain, payer.address)
    async with x402HttpxClient(official_client(chain, payer, 5 * USDC), timeout=60) as client:
        response = await client.post(stack.url + TOPUP, params={"payer": key, "amount": "5"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["payer"], body["asset"], body["credited"], body["balance"]) == (
        key,
        "USDF",
        "5",
        "5",
    )
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert settled.success and settled.transaction == body["transaction"]
    assert settled.network == chain.network and settled.payer == payer.address
    assert settled.amount == str(5 * USDC)  # what moved on chain, in the token's units
    assert b64json(response.headers["payment-response"])["asset"] == chain.token
    assert chain.w3.eth.get_transaction_receipt(body["transaction"])["status"] == 1
    assert onchain(chain, payer.address) == (before[0] - 5 * USDC, before[1] + 5 * USDC)
    receipt = body["receipt"]
    keys = {stack.gateway_identity.kid: stack.gateway_identity.public_key}
    assert protocol.verify_receipt(receipt, keys)
    assert (receipt["kind"], receipt["payer"], receipt["amount"], receipt["balance"]) == (
        "topup",
        key,
        "5",
        "5",
    )
    assert receipt["authorizer"] == payer.address
    assert b64json(response.headers["x-payment-response"]) == receipt  # ours, kept apart
    account = await ledger.account(key)
    assert (account.status, account.balances, account.credited) == (
        "active",
        {"USDF": 5 * USDC},
        {"USDF": 5 * USDC},
    )

    async with httpx.AsyncClient(base_url=stack.url, auth=X402Auth(wallet), timeout=30) as sdk:
        for _ in range(100):
            paid = await sdk.get(CHEAP)
            assert paid.status_code == 200, paid.text
    assert await stack.balance(key) == 5 * USDC - 100 * 1_000


async def test_a_replayed_topup_authorization_credits_nothing_and_gets_its_receipt_again(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    key = Identity.generate().public_key
    header = await signed_topup(chain, http, key, "2", payer_index=1)
    payer = payers(chain)[1]
    before = onchain(chain, payer.address)
    gas_nonce = chain.transaction_count(facilitator_account(chain).address)
    first = await http.post(
        TOPUP, params={"payer": key, "amount": "2"}, headers={"PAYMENT-SIGNATURE": header}
    )
    assert first.status_code == 200, first.text
    # The same key (a retry after a lost answer): the same credit's answer, nothing more.
    again = await http.post(
        TOPUP, params={"payer": key, "amount": "2"}, headers={"PAYMENT-SIGNATURE": header}
    )
    assert again.status_code == 200, again.text
    receipt, repeated = first.json()["receipt"], again.json()["receipt"]
    assert repeated["receipt_id"] == receipt["receipt_id"]
    assert repeated["transaction"] == receipt["transaction"] and repeated["balance"] == "2"
    assert protocol.verify_receipt(
        repeated, {stack.gateway_identity.kid: stack.gateway_identity.public_key}
    )
    other = await http.post(  # someone else's key: that authorization is spent
        TOPUP,
        params={"payer": Identity.generate().public_key, "amount": "2"},
        headers={"PAYMENT-SIGNATURE": header},
    )
    assert (other.status_code, other.json()["error"]) == (402, "nonce_reused")
    assert await stack.balance(key) == 2 * USDC
    assert onchain(chain, payer.address) == (before[0] - 2 * USDC, before[1] + 2 * USDC)
    assert chain.transaction_count(facilitator_account(chain).address) == gas_nonce + 1


async def test_concurrent_copies_of_one_topup_credit_once(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    key = Identity.generate().public_key
    header = await signed_topup(chain, http, key, "3", payer_index=2)
    answers = await asyncio.gather(
        *(
            http.post(
                TOPUP, params={"payer": key, "amount": "3"}, headers={"PAYMENT-SIGNATURE": header}
            )
            for _ in range(10)
        )
    )
    # One settles and credits; the copies find it done and get its answer.
    assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
    assert len({a.json()["receipt"]["receipt_id"] for a in answers}) == 1
    assert await stack.balance(key) == 3 * USDC


async def test_a_suspended_payer_is_refused_before_anything_settles(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain, ledger: Ledger
) -> None:
    key = Identity.generate().public_key
    header = await signed_topup(chain, http, key, "1", payer_index=3)
    await ledger.register(key)
    await ledger.set_status(key, SUSPENDED)
    before = onchain(chain, payers(chain)[3].address)
    response = await http.post(
        TOPUP, params={"payer": key, "amount": "1"}, headers={"PAYMENT-SIGNATURE": header}
    )
    assert (response.status_code, response.json()["error"]) == (403, "payer_suspended")
    assert onchain(chain, payers(chain)[3].address) == before
    unpaid = await http.post(TOPUP, params={"payer": key, "amount": "1"})
    assert (unpaid.status_code, unpaid.json()["error"]) == (403, "payer_suspended")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"payer": "not-a-key", "amount": "5"}, "bad_request"),
        ({"amount": "5"}, "bad_request"),
        ({"payer": "KEY", "amount": "0.5"}, "bad_request"),  # below topup_min
        ({"payer": "KEY", "amount": "51"}, "bad_request"),  # above topup_max
        ({"payer": "KEY", "amount": "1.0000001"}, "bad_request"),  # more decimals than USDF
        ({"payer": "KEY", "amount": "-1"}, "bad_request"),
    ],
)
async def test_bad_topup_requests_are_400(
    http: httpx.AsyncClient, params: dict[str, str], reason: str
) -> None:
    key = Identity.generate().public_key
    params = {k: (key if v == "KEY" else v) for k, v in params.items()}
    response = await http.post(TOPUP, params=params)
    assert (response.status_code, response.json()["error"]) == (400, reason)


async def test_a_topup_is_a_post(http: httpx.AsyncClient) -> None:
    key = Identity.generate().public_key
    response = await http.get(TOPUP, params={"payer": key, "amount": "5"})
    assert (response.status_code, response.json()["error"]) == (400, "bad_request")


async def test_timings_topup_versus_prepaid(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    """Not a benchmark, nothing asserted on the numbers: p50 in this run, for the record."""
    wallet = Identity.generate()
    await stack.fund(wallet.public_key, "1")
    topup_ms, prepaid_ms = [], []
    for _ in range(10):
        headers = pay_direct(stack, wallet, f"GET {CHEAP}", "0.001")
        start = time.perf_counter()
        assert (await http.get(CHEAP, headers=headers)).status_code == 200
        prepaid_ms.append((time.perf_counter() - start) * 1000)
        key = Identity.generate().public_key
        header = await signed_topup(chain, http, key, "1", payer_index=4)
        start = time.perf_counter()
        answer = await http.post(
            TOPUP, params={"payer": key, "amount": "1"}, headers={"PAYMENT-SIGNATURE": header}
        )
        assert answer.status_code == 200
        topup_ms.append((time.perf_counter() - start) * 1000)
    print(
        f"\np50 over 10: prepaid request {statistics.median(prepaid_ms):.1f} ms, "
        f"top-up (verify + settle on anvil + credit) {statistics.median(topup_ms):.1f} ms"
    )


async def test_a_lost_settle_answer_is_resolved_on_chain_and_credited_once(
    chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    """The facilitator's /settle answer comes too late (its transaction waits unmined):
    the outcome is unknown, so the sidecar looks the authorization up on chain before
    crediting."""
    settings = exact_settings(
        chain, facilitator, facilitator_settle_timeout_ms=1000, chain_lookup_ms=10_000
    )
    with Stack(ROUTES, settings=settings) as lossy:
        async with httpx.AsyncClient(base_url=lossy.url, timeout=60) as http:
            key = Identity.generate().public_key
            payer = payers(chain)[5]
            before = onchain(chain, payer.address)
            header = await signed_topup(chain, http, key, "4", payer_index=5)
            params = {"payer": key, "amount": "4"}
            response = await answer_lost(
                chain, http.post(TOPUP, params=params, headers={"PAYMENT-SIGNATURE": header})
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert chain.w3.eth.get_transaction_receipt(body["transaction"])["status"] == 1
            allowed = [line for line in topup_lines(lossy, key) if line["decision"] == "allow"]
            assert [line["settled_via"] for line in allowed] == ["chain"]
            again = await http.post(TOPUP, params=params, headers={"PAYMENT-SIGNATURE": header})
            assert again.status_code == 200, again.text  # the same answer; no new credit
            assert again.json()["receipt"]["receipt_id"] == body["receipt"]["receipt_id"]
            assert await lossy.balance(key) == 4 * USDC
            assert onchain(chain, payer.address) == (before[0] - 4 * USDC, before[1] + 4 * USDC)

            # A paid request whose settle answer is lost the same way is served once the
            # chain shows the transfer, and its receipt names the transaction found there.
            before = onchain(chain, payer.address)
            async with x402HttpxClient(official_client(chain, payer, 1_000), timeout=60) as c:
                paid = await answer_lost(chain, c.get(lossy.url + CHEAP))
            assert paid.status_code == 200, paid.text
            settled = decode_payment_response_header(paid.headers["payment-response"])
            assert settled.success and settled.transaction.startswith("0x")
            assert chain.w3.eth.get_transaction_receipt(settled.transaction)["status"] == 1  # type: ignore[arg-type]
            assert onchain(chain, payer.address) == (before[0] - 1_000, before[1] + 1_000)
