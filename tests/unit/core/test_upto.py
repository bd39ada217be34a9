"""core/upto.py: the `upto` offer and the pure checks of an envelope the official client
signs, before the ledger or the facilitator is called."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
from eth_account import Account
from eth_utils.crypto import keccak
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm import constants as official
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements

from sidecar.core import decision, exact, phases, upto
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    UnsupportedScheme,
)
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.server.config import Settings

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OPERATOR = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
FACILITATOR = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
ONCHAIN = {"USDF": {"network": "eip155:31337", "token": TOKEN, "name": "USD Coin", "version": "2"}}
CONFIG = {"onchain": ONCHAIN, "pay_to": OPERATOR, "facilitator_url": "http://127.0.0.1:1"}
MAXIMUM = 100_000
KEY = "0x" + "42" * 32
METERED = phases.ResponsePhase(unit="row", unit_price=1_000, max_units=100)


def terms(listed: bool = True) -> exact.ExactTerms:
    found = Settings.from_mapping(CONFIG, {}).exact_terms()
    assert found is not None
    if listed:
        found.upto_extra["eip155:31337"] = {upto.FACILITATOR_ADDRESS: FACILITATOR}
    return found


def offer() -> Offer:
    return upto.offer(terms().assets["USDF"], MAXIMUM, terms(), FACILITATOR)


def signed() -> dict[str, Any]:
    """What the official client sends for the offer (its PaymentPayload, as JSON)."""
    requirements = PaymentRequirements.model_validate(offer().to_wire())
    client = UptoEvmClientScheme(EthAccountSigner(Account.from_key(KEY)))
    return {
        "x402Version": 2,
        "accepted": offer().to_wire(),
        "payload": client.create_payment_payload(requirements),
    }


def test_the_canonical_addresses_are_the_official_ones() -> None:
    assert upto.PERMIT2 == official.PERMIT2_ADDRESS
    assert upto.UPTO_PROXY == official.X402_UPTO_PERMIT2_PROXY_ADDRESS
    assert upto.SCHEME == official.SCHEME_UPTO


def test_the_official_clients_envelope_passes_and_restores() -> None:
    now = int(time.time())
    envelope = signed()
    found = upto.verify(envelope, offer(), now)
    assert found.payer == Account.from_key(KEY).address.lower()
    assert found.sender == Account.from_key(KEY).address
    assert (found.maximum, found.requirements) == (MAXIMUM, offer())
    assert found.key == f"eip155:31337:permit2:{found.nonce}"
    assert upto.restore(envelope, offer()) == found
    settle = found.for_amount(37_000)
    assert (settle.amount, settle.extra) == ("37000", offer().extra)


def test_the_settle_response_says_the_amount_settled() -> None:
    found = upto.verify(signed(), offer(), int(time.time()))
    assert found.settle_response(37_000, "0xabc") == {
        "success": True,
        "payer": found.sender,
        "transaction": "0xabc",
        "network": "eip155:31337",
        "amount": "37000",
        "asset": TOKEN,
    }
    failed = found.settle_response(0, "", "service_failed", "the service answered 500")
    assert (failed["success"], failed["errorReason"], "amount" in failed) == (
        False,
        "service_failed",
        False,
    )


def _edit(envelope: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    edited = copy.deepcopy(envelope)
    *parents, last = path.split(".")
    target = edited
    for part in parents:
        target = target[part]
    target[last] = value
    return edited


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("accepted.scheme", "exact", UnsupportedScheme),
        ("accepted.network", "eip155:8453", InvoiceMismatch),
        ("accepted.amount", "1", InvoiceMismatch),
        ("accepted.payTo", FACILITATOR, InvoiceMismatch),
        ("payload.permit2Authorization.permitted.amount", "1", InvoiceMismatch),
        ("payload.permit2Authorization.permitted.token", OPERATOR, InvoiceMismatch),
        ("payload.permit2Authorization.spender", OPERATOR, InvoiceMismatch),
        ("payload.permit2Authorization.witness.to", FACILITATOR, InvoiceMismatch),
        ("payload.permit2Authorization.witness.facilitator", OPERATOR, InvoiceMismatch),
        ("payload.permit2Authorization.witness.validAfter", str(2**40), InvoiceExpired),
        ("payload.permit2Authorization.deadline", "1", InvoiceExpired),
        ("payload.permit2Authorization.deadline", str(2**40), InvoiceMismatch),
        ("payload.permit2Authorization.nonce", "-1", MalformedPayment),
        ("payload.permit2Authorization.from", "alice", MalformedPayment),
        ("payload.signature", "0x12", MalformedPayment),
        ("payload.permit2Authorization.witness", None, MalformedPayment),
    ],
)
def test_a_mismatch_is_refused_before_anyone_is_called(
    path: str, value: Any, error: type[PaymentError]
) -> None:
    with pytest.raises(error):
        upto.verify(_edit(signed(), path, value), offer(), int(time.time()))


def test_the_402_offers_upto_where_the_response_settles_once_the_facilitator_lists_it() -> None:
    usdf = Asset("USDF", 6)
    request = Request("GET", "/rows", "api.test", "http", None)
    for listed, phase, schemes in (
        (True, METERED, ["prepaid-ed25519", "upto"]),
        (True, phases.ResponsePhase(), ["prepaid-ed25519", "exact", "upto"]),
        (True, None, ["prepaid-ed25519", "exact"]),  # settled before the service: no amount
        (False, METERED, ["prepaid-ed25519"]),  # no facilitatorAddress to sign for
    ):
        gateway = Gateway(Identity.generate(), b"k" * 32, exact=terms(listed))
        price = Price("rows", MAXIMUM, usdf, phase=phase)
        fresh = decision.invoice(request, price, gateway, int(time.time()))
        required = decision.payment_required(fresh, request, price, gateway, "r", "m")
        assert [o["scheme"] for o in required["accepts"]] == schemes
        sponsoring = upto.GAS_SPONSORING in required.get("extensions", {})
        assert sponsoring == ("upto" in schemes)
        if "upto" in schemes:
            assert required["accepts"][-1] == offer().to_wire()


def test_the_nonce_bitmap_call_names_permit2s_word_and_bit() -> None:
    owner = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
    data, bit = upto.nonce_bitmap_call(owner, str(3 * 256 + 5))
    assert data.startswith("0x" + keccak(text="nonceBitmap(address,uint256)")[:4].hex())
    assert data[10:74] == owner.lower()[2:].rjust(64, "0")
    assert int(data[74:], 16) == 3 and bit == 1 << 5
