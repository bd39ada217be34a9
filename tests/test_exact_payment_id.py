"""The official x402 Python client's `payment-identifier` flow through the gateway (issue
#23, "what it must show" 4): an unmodified `x402Client` paying `exact` on anvil attaches a
payment id with the official extension (`x402.extensions.payment_identifier`); the same id
twice pays once on chain and gets the same body; the id reused for another request is
`409`, nothing settled.

The gateway side (the 402's `payment-identifier` declaration, the ledger's record of each
payment's outcome, redelivery and the 409) is the exactly-once half of the issue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    append_payment_identifier_to_extensions,
)
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header

from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    facilitator_account,
    official_client,
    payers,
)
from sidecar.tools.stack import Stack
from tests.support.exact import b64json, balances

PAID = "/api/paid"
PRICE = 10_000
ROUTES = {"paid": {"method": "GET", "path": PAID, "price": "0.01", "description": "paid"}}
PAYMENT_ID = "pay_retry23_same_purchase_0001"


class FixedPaymentId:
    """A client extension (the official ClientExtension protocol) that attaches one chosen
    payment id, with the official helper, where the 402 declares the extension."""

    key = PAYMENT_IDENTIFIER
    hooks = None
    transport_hooks = None

    def __init__(self, payment_id: str) -> None:
        self.payment_id = payment_id

    def enrich_payment_payload(self, payload: Any, required: Any) -> Any:
        extensions = dict(payload.extensions or required.extensions or {})
        append_payment_identifier_to_extensions(extensions, self.payment_id)
        return payload.model_copy(update={"extensions": extensions})


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    with Stack(ROUTES, settings=exact_settings(chain, facilitator)) as running:
        yield running


async def pay(stack: Stack, chain: AnvilChain, path: str) -> httpx.Response:
    client = official_client(chain, payers(chain)[0], PRICE)
    client.register_extension(FixedPaymentId(PAYMENT_ID))
    async with x402HttpxClient(client, timeout=60) as http:
        response: httpx.Response = await http.get(stack.url + path)
    return response


async def test_the_same_payment_id_twice_pays_once_and_reused_elsewhere_is_409(
    stack: Stack, chain: AnvilChain
) -> None:
    async with httpx.AsyncClient(timeout=30) as plain:
        challenge = await plain.get(stack.url + PAID)
    declared = b64json(challenge.headers["payment-required"]).get("extensions") or {}
    assert PAYMENT_IDENTIFIER in declared, "the 402 must declare payment-identifier"
    payer = payers(chain)[0]
    before = balances(chain, payer.address)
    gas = chain.transaction_count(facilitator_account(chain).address)

    first = await pay(stack, chain, PAID)
    assert first.status_code == 200, first.text
    settled = decode_payment_response_header(first.headers["payment-response"])
    again = await pay(stack, chain, PAID)  # a new authorization, the same payment id
    assert again.status_code == 200, again.text
    assert again.content == first.content
    assert decode_payment_response_header(again.headers["payment-response"]).transaction == (
        settled.transaction
    )
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert chain.transaction_count(facilitator_account(chain).address) == gas + 1

    elsewhere = await pay(stack, chain, PAID + "?other=1")  # the id, another request
    assert elsewhere.status_code == 409, elsewhere.text
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert chain.transaction_count(facilitator_account(chain).address) == gas + 1
