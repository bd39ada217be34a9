"""x402 `upto` through the real stack: anvil with Circle's FiatTokenV2_2 and the project's
Permit2 and upto proxy test doubles at the canonical addresses, `x402 facilitator serve`
(the official upto facilitator), real Envoy (ext_authz + ext_proc), the sidecar, Redis and
the demo upstream; paid by the unmodified official x402 Python client. The payer signs a
maximum (the metered route's hold); the response phase settles usage x unit price, capped
at it. Nothing is mocked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from importlib.resources import files
from typing import Any

import httpx
import pytest
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm.constants import ERC20_ALLOWANCE_ABI
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.agent import EvmKey, Wallet, X402Auth, receipt_of
from sidecar.core import protocol, upto
from sidecar.tools import permit2
from sidecar.tools.chain import AnvilChain, DevAccount
from sidecar.tools.contracts import render_upto_test_doubles
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    facilitator_account,
    payers,
    payment_signature,
    upto_client,
)
from sidecar.tools.stack import Stack
from tests.support.exact import answer_lost, b64json, balances, run_node_client

ROWS, REPORT, UPFRONT = "/api/v1/data/rows", "/api/v1/report", "/api/paid"
UNIT = 1_000  # 0.001 USDF = 0.001 USDC a row
MAXIMUM = 100 * UNIT  # the metered route's hold: 100 rows
PRICE = 10_000
MARKER = "demo-upstream"
ROUTES: dict[str, dict[str, Any]] = {
    "rows": {"method": "GET", "path": ROWS, "unit": "row", "unit_price": "0.001", "max_units": 100},
    "report": {"method": "GET", "path": REPORT, "price": "0.01", "charge": "on_success"},
    "paid": {"method": "GET", "path": UPFRONT, "price": "0.01"},
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


def approved(chain: AnvilChain, payer: DevAccount) -> DevAccount:
    permit2.approve(chain.w3, chain.token, payer.address)
    return payer


def keys(stack: Stack) -> dict[str, str]:
    return {stack.gateway_identity.kid: stack.gateway_identity.public_key}


async def sign_upto(
    chain: AnvilChain, http: httpx.AsyncClient, path: str, payer: DevAccount
) -> tuple[str, PaymentPayload]:
    """The official client's PAYMENT-SIGNATURE for `path`'s 402, paying `upto`."""
    challenge = await http.get(path)
    assert challenge.status_code == 402
    required = PaymentRequired.model_validate(b64json(challenge.headers["payment-required"]))
    client = upto_client(chain.network, chain.token, payer.key, MAXIMUM)
    payload = await client.create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    return payment_signature(payload), payload


async def test_the_402_offers_upto_where_the_amount_is_known_at_the_response(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    offers = {}
    for path in (ROWS, REPORT, UPFRONT):
        required = b64json((await http.get(path)).headers["payment-required"])
        offers[path] = {offer["scheme"]: offer for offer in required["accepts"]}
        sponsoring = upto.GAS_SPONSORING in required.get("extensions", {})
        assert sponsoring == ("upto" in offers[path])
    assert sorted(offers[ROWS]) == ["prepaid-ed25519", "upto"]  # exact: one fixed value
    assert sorted(offers[REPORT]) == ["exact", "prepaid-ed25519", "upto"]
    assert sorted(offers[UPFRONT]) == ["exact", "prepaid-ed25519"]  # settled before it runs
    rows = offers[ROWS]["upto"]
    assert (rows["amount"], rows["asset"], rows["network"]) == (
        str(MAXIMUM),
        chain.token,
        chain.network,
    )
    assert rows["extra"]["assetTransferMethod"] == "permit2"
    assert rows["extra"]["facilitatorAddress"] == facilitator_account(chain).address
    assert offers[REPORT]["upto"]["amount"] == str(PRICE)


async def test_the_official_client_pays_the_rows_served(stack: Stack, chain: AnvilChain) -> None:
    """37 of 100 rows: 37 x the unit price settles on chain, the maximum was 100."""
    payer = approved(chain, payers(chain)[0])
    before, sent = balances(chain, payer.address), settles(chain)
    client = upto_client(chain.network, chain.token, payer.key, MAXIMUM)
    async with x402HttpxClient(client, timeout=60) as paying:
        response = await paying.get(stack.url + ROWS, params={"limit": "37"})

    assert response.status_code == 200, response.text
    assert len(response.json()["rows"]) == 37 and response.json()["service"] == MARKER
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert (settled.success, settled.amount, settled.payer) == (True, str(37 * UNIT), payer.address)
    assert settled.network == chain.network
    tx = chain.w3.eth.get_transaction_receipt(settled.transaction)  # type: ignore[arg-type]
    assert tx["status"] == 1
    assert balances(chain, payer.address) == (before[0] - 37 * UNIT, before[1] + 37 * UNIT)
    assert settles(chain) == sent + 1
    receipt = b64json(response.headers["x-payment-response"])
    assert protocol.verify_receipt(receipt, keys(stack))
    assert (receipt["scheme"], receipt["amount"], receipt["held"]) == ("upto", "0.037", "0.1")
    assert receipt["transaction"] == settled.transaction
    [capture] = await asyncio.to_thread(
        stack.wait_decisions,
        lambda e: e.get("phase") == "response" and e.get("receipt_id") == receipt["receipt_id"],
    )
    assert (capture["decision"], capture["captured"], capture["units"]) == ("capture", "0.037", 37)


async def test_a_route_charged_on_success_settles_its_price_with_upto(
    stack: Stack, chain: AnvilChain
) -> None:
    payer = payers(chain)[0]  # approved above
    before = balances(chain, payer.address)
    client = upto_client(chain.network, chain.token, payer.key, MAXIMUM)
    async with x402HttpxClient(client, timeout=60) as paying:
        response = await paying.get(stack.url + REPORT)

    assert response.status_code == 200, response.text
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert (settled.success, settled.amount) == (True, str(PRICE))
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    receipt = b64json(response.headers["x-payment-response"])
    assert (receipt["scheme"], receipt["amount"], receipt["held"]) == ("upto", "0.01", "0.01")
    # No decision line carries the signed authorization.
    assert all("signature" not in json.dumps(line) for line in stack.decisions())


async def test_a_failed_service_settles_nothing_and_the_authorization_pays_later(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    payer = approved(chain, payers(chain)[1])
    header, _ = await sign_upto(chain, http, ROWS, payer)
    before, sent = balances(chain, payer.address), settles(chain)

    failed = await http.get(ROWS, params={"fail": "500"}, headers={"PAYMENT-SIGNATURE": header})

    assert failed.status_code == 500 and failed.json()["error"] == "demo_failure"
    unsettled = decode_payment_response_header(failed.headers["payment-response"])
    assert (unsettled.success, unsettled.error_reason, unsettled.amount) == (
        False,
        "service_failed",
        None,
    )
    refund = b64json(failed.headers["x-payment-response"])
    assert protocol.verify_receipt(refund, keys(stack))
    assert (refund["scheme"], refund["amount"], refund["released"]) == ("upto", "0", "0.1")
    assert balances(chain, payer.address) == before and settles(chain) == sent

    served = await http.get(ROWS, params={"limit": "5"}, headers={"PAYMENT-SIGNATURE": header})

    assert served.status_code == 200, served.text
    settled = b64json(served.headers["payment-response"])
    assert (settled["success"], settled["amount"], settled["asset"]) == (
        True,
        str(5 * UNIT),
        chain.token,
    )
    assert balances(chain, payer.address) == (before[0] - 5 * UNIT, before[1] + 5 * UNIT)
    assert settles(chain) == sent + 1


async def test_usage_above_the_maximum_is_capped_and_a_replay_is_refused(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    payer = approved(chain, payers(chain)[2])
    header, _ = await sign_upto(chain, http, ROWS, payer)
    before, sent = balances(chain, payer.address), settles(chain)

    response = await http.get(ROWS, params={"usage": "1000"}, headers={"PAYMENT-SIGNATURE": header})

    assert response.status_code == 200, response.text
    settled = b64json(response.headers["payment-response"])
    assert settled["amount"] == str(MAXIMUM)  # 1000 rows reported, the maximum settled
    assert balances(chain, payer.address) == (before[0] - MAXIMUM, before[1] + MAXIMUM)
    assert settles(chain) == sent + 1

    again = await http.get(ROWS, params={"limit": "1"}, headers={"PAYMENT-SIGNATURE": header})

    assert (again.status_code, again.json()["error"]) == (402, "nonce_reused")
    assert settles(chain) == sent + 1  # refused before anything went to the chain
    assert balances(chain, payer.address) == (before[0] - MAXIMUM, before[1] + MAXIMUM)


async def test_a_payer_without_an_approval_pays_through_gas_sponsoring(
    stack: Stack, chain: AnvilChain
) -> None:
    payer = payers(chain)[3]  # never approved Permit2
    token = chain.w3.eth.contract(address=chain.token, abi=ERC20_ALLOWANCE_ABI)
    assert token.functions.allowance(payer.address, permit2.PERMIT2).call() == 0
    before = balances(chain, payer.address)
    client = upto_client(chain.network, chain.token, payer.key, MAXIMUM, chain.rpc_url)
    async with x402HttpxClient(client, timeout=60) as paying:
        response = await paying.get(stack.url + ROWS, params={"limit": "12"})

    assert response.status_code == 200, response.text
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert (settled.success, settled.amount) == (True, str(12 * UNIT))
    assert balances(chain, payer.address) == (before[0] - 12 * UNIT, before[1] + 12 * UNIT)
    # The permit the facilitator sent in the same transaction let Permit2 move the maximum.
    left = token.functions.allowance(payer.address, permit2.PERMIT2).call()
    assert left == MAXIMUM - 12 * UNIT


async def test_the_official_typescript_client_pays_upto(stack: Stack, chain: AnvilChain) -> None:
    """@x402/fetch with @x402/evm's UptoEvmScheme (viem), unmodified, run by node."""
    payer = approved(chain, payers(chain)[4])
    before = balances(chain, payer.address)
    job = {
        "client": "fetch", "url": f"{stack.url}{ROWS}?limit=37", "method": "GET",
        "privateKey": payer.key, "network": chain.network, "token": chain.token,
        "cap": str(MAXIMUM), "scheme": "upto",
    }  # fmt: skip
    answer = await run_node_client(job)

    assert answer["status"] == 200, answer["body"]
    settled = answer["settled"]
    assert (settled["success"], settled["amount"], settled["payer"]) == (
        True,
        str(37 * UNIT),
        payer.address,
    )
    assert balances(chain, payer.address) == (before[0] - 37 * UNIT, before[1] + 37 * UNIT)


def test_the_committed_test_doubles_are_what_solc_compiles() -> None:
    """The chain places the committed runtime code; compiling the project's Solidity again
    with the pinned solc-js and settings gives the same bytes."""
    assert render_upto_test_doubles() == (
        files("sidecar.tools").joinpath(permit2.ARTIFACT).read_text("utf-8")
    )


def test_the_sdk_pays_a_metered_route_with_upto_and_counts_what_settled(
    stack: Stack, chain: AnvilChain
) -> None:
    """A wallet with only an EVM key (no prepaid possible): X402Auth signs the route's
    maximum with `upto`; the budget is charged the 37 rows settled, not the 100 held."""
    payer = approved(chain, payers(chain)[5])
    wallet = Wallet(evm=EvmKey.from_text(payer.key), budget="1")
    before = balances(chain, payer.address)
    with httpx.Client(base_url=stack.url, auth=X402Auth(wallet, strict=True), timeout=60) as http:
        response = http.get(ROWS, params={"limit": "37"})

    assert response.status_code == 200, response.text
    receipt = receipt_of(response)
    assert receipt is not None and receipt.verified
    assert (receipt.fields["scheme"], receipt.amount) == ("upto", "0.037")
    assert balances(chain, payer.address) == (before[0] - 37 * UNIT, before[1] + 37 * UNIT)
    assert (wallet.spent("USDF"), wallet.remaining("USDF")) == ("0.037", "0.963")


async def test_a_dead_facilitator_at_the_response_is_503_and_the_authorization_pays_later(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    """Verified at the check, the facilitator gone before the settle: the response is not
    served (fail closed), nothing moved, the reservation is freed and the same
    authorization pays once the facilitator is back."""
    payer = payers(chain)[1]  # approved above
    header, _ = await sign_upto(chain, http, ROWS, payer)
    before, sent = balances(chain, payer.address), settles(chain)
    pending = asyncio.create_task(
        http.get(ROWS, params={"limit": "9", "sleep": "2"}, headers={"PAYMENT-SIGNATURE": header})
    )
    await asyncio.to_thread(
        stack.wait_decisions,
        lambda e: e.get("reason") == "held" and e.get("payer") == payer.address.lower(),
        1,
        20.0,
    )
    facilitator.kill()  # between the verify and the settle
    try:
        response = await pending
        assert (response.status_code, response.json()["error"]) == (503, "facilitator_unavailable")
        assert MARKER not in response.text and "payment-response" not in response.headers
        assert balances(chain, payer.address) == before and settles(chain) == sent
    finally:
        facilitator.start()
    served = await http.get(ROWS, params={"limit": "9"}, headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200, served.text
    assert b64json(served.headers["payment-response"])["amount"] == str(9 * UNIT)
    assert balances(chain, payer.address) == (before[0] - 9 * UNIT, before[1] + 9 * UNIT)


async def test_a_settle_answer_lost_is_resolved_by_permit2s_nonce_on_chain(
    chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    """The facilitator sends the settle but its answer comes too late (anvil mines nothing
    until told): the sidecar finds the authorization's Permit2 nonce used once mined and
    serves the response as settled; a replay stays refused."""
    settings = exact_settings(chain, facilitator, facilitator_settle_timeout_ms=1000)
    payer = payers(chain)[2]  # approved above
    with Stack(ROUTES, settings=settings) as slow:
        async with httpx.AsyncClient(base_url=slow.url, timeout=60) as http:
            header, _ = await sign_upto(chain, http, ROWS, payer)
            before = balances(chain, payer.address)
            served = await answer_lost(
                chain, http.get(ROWS, params={"limit": "3"}, headers={"PAYMENT-SIGNATURE": header})
            )
            again = await http.get(ROWS, headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200, served.text
    assert served.json()["service"] == MARKER
    settled = b64json(served.headers["payment-response"])
    assert (settled["success"], settled["amount"]) == (True, str(3 * UNIT))
    assert balances(chain, payer.address) == (before[0] - 3 * UNIT, before[1] + 3 * UNIT)
    assert (again.status_code, again.json()["error"]) == (402, "nonce_reused")
