"""Typed wire values: each round-trips to the same dict, so signatures made by an earlier
version still verify (the vectors were signed by the dict-based code before the types)."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from sidecar.core import protocol
from sidecar.core.errors import InvalidChallenge, MalformedPayment, UnsupportedScheme
from sidecar.core.identity import Identity
from sidecar.core.protocol import Invoice, Offer, Proof

WALLET = Identity.from_seed_text(base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode())
TERMS = Invoice("n_" + "a" * 22, "GET /api", "USDF", "0.25", "gw_x", 1_763_712_000)
INVOICED = dataclasses.replace(TERMS, invoice_id="inv_" + "b" * 22)
# X-Payment headers signed by the code before the typed values (HEAD 74aa932).
INVOICED_VECTOR = (
    "eyJhbW91bnQiOiIwLjI1IiwiYXNzZXQiOiJVU0RGIiwiZXhwaXJlc19hdCI6MTc2MzcxMjAwMCwiaW52b2ljZV9pZC"
    "I6Imludl9iYmJiYmJiYmJiYmJiYmJiYmJiYmJiIiwibm9uY2UiOiJuX2FhYWFhYWFhYWFhYWFhYWFhYWFhYWEiLCJw"
    "YXllZSI6Imd3X3giLCJwYXllciI6IkE2RUh2X1BPRUw0ZGNOMFk1MHZBbVdmazFqQ2JwUTFmSGR5R1pCSlZNYmciLC"
    "JyZXNvdXJjZSI6IkdFVCAvYXBpIiwic2NoZW1lIjoicHJlcGFpZC1lZDI1NTE5Iiwic2lnbmF0dXJlIjoidV81azVY"
    "alBoaUFGMXlEVkVVcWNRVzNwRkhLZE15MjVMMzU1ci1teVdJSFFRalJieHdXYW0yWTJBTGMyeW12cDMyVGoxQVM5WV"
    "B3c3BpaUo1S0tOQmciLCJ2ZXJzaW9uIjoiZnRoLXg0MDIvMi4wIn0="
)
DIRECT_VECTOR = (
    "eyJhbW91bnQiOiIwLjI1IiwiYXNzZXQiOiJVU0RGIiwiZXhwaXJlc19hdCI6MTc2MzcxMjAwMCwibm9uY2UiOiJuX2"
    "FhYWFhYWFhYWFhYWFhYWFhYWFhYWEiLCJwYXllZSI6Imd3X3giLCJwYXllciI6IkE2RUh2X1BPRUw0ZGNOMFk1MHZB"
    "bVdmazFqQ2JwUTFmSGR5R1pCSlZNYmciLCJyZXNvdXJjZSI6IkdFVCAvYXBpIiwic2NoZW1lIjoicHJlcGFpZC1lZD"
    "I1NTE5Iiwic2lnbmF0dXJlIjoiUEtIcFp2SXdpbmlJQWpkTzV5MUxfbkdGaC1NYzVkSGZMTGtRZGtCcG80NGRBLUVD"
    "eDdEOXB0VlFMbkUteVZfRTZSYi02OUNVYnRQYXdTNEFWZTZWQUEiLCJ2ZXJzaW9uIjoiZnRoLXg0MDIvMi4wIn0="
)


@pytest.mark.parametrize(("terms", "vector"), [(INVOICED, INVOICED_VECTOR), (TERMS, DIRECT_VECTOR)])
def test_a_signed_proof_has_the_bytes_it_had_before_the_types(terms: Invoice, vector: str) -> None:
    proof = Proof.sign(terms, WALLET)
    assert protocol.encode_header(proof.to_wire()) == vector
    assert protocol.sign_proof(terms, WALLET) == proof.to_wire()  # the typed path
    assert protocol.sign_proof(terms.to_wire(), WALLET) == proof.to_wire()  # and the dict one


@pytest.mark.parametrize("vector", [INVOICED_VECTOR, DIRECT_VECTOR])
def test_a_proof_round_trips_to_the_same_wire_and_signed_message(vector: str) -> None:
    wire = protocol.decode_payment(vector, 4096)
    proof = Proof.from_wire(wire)
    assert proof.to_wire() == wire
    assert protocol.canonical_json(proof.to_wire()) == base64.b64decode(vector)
    assert proof.signed_message == Proof.sign(proof.invoice, WALLET).signed_message
    assert proof.invoice.to_wire() == {
        k: v for k, v in wire.items() if k not in ("payer", "signature")
    }
    assert proof.is_direct == (proof.invoice_id is None)


def test_an_invoice_round_trips_and_ignores_the_402s_extra_fields() -> None:
    wire = INVOICED.to_wire()
    assert wire == {**TERMS.terms, "invoice_id": "inv_" + "b" * 22}
    assert (
        Invoice.from_wire({**wire, "amount_atomic": "250000", "facilitator_url": "x"}) == INVOICED
    )
    assert "invoice_id" not in TERMS.to_wire()  # a direct payment's terms have none


def test_an_issued_invoice_carries_the_mac_of_its_terms() -> None:
    secret = b"s" * 32
    issued = Invoice.issue(secret, "GET /api", "USDF", "0.25", "gw_x", 1_763_712_000)
    assert issued.invoice_id == protocol.invoice_id(secret, issued.terms)
    assert protocol.invoice_matches(secret, issued.terms, issued.invoice_id or "")
    assert issued.nonce != Invoice.direct("GET /api", "USDF", "0.25", "gw_x", 0).nonce


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"invoice_id": None}, "no valid 'invoice_id'"),
        ({"expires_at": "1763712000"}, "no valid 'expires_at'"),
        ({"scheme": "exact"}, "cannot pay a fth-x402/2.0/exact invoice"),
        ({"version": "fth-x402/1.0"}, "cannot pay a fth-x402/1.0/prepaid-ed25519 invoice"),
    ],
)
def test_a_bad_invoice_is_an_invalid_challenge(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidChallenge, match=message):
        Invoice.from_wire({**INVOICED.to_wire(), **change}, "the 402's invoice")


def test_a_bad_proof_raises_the_protocols_reason() -> None:
    wire = protocol.decode_payment(INVOICED_VECTOR, 4096)
    with pytest.raises(UnsupportedScheme) as scheme:
        Proof.from_wire({**wire, "scheme": "exact"})
    with pytest.raises(MalformedPayment) as malformed:
        Proof.from_wire({**wire, "expires_at": True})
    assert (scheme.value.reason, malformed.value.reason) == (
        "unsupported_scheme",
        "malformed_payment",
    )


OFFER_WIRE = {
    "scheme": "exact",
    "network": "eip155:84532",
    "amount": "10000",
    "asset": "0x" + "ab" * 20,
    "payTo": "0x" + "cd" * 20,
    "maxTimeoutSeconds": 300,
    "extra": {"name": "USDC", "version": "2"},
}
OFFER_VECTOR = (
    b'{"amount":"10000","asset":"0xabababababababababababababababababababab",'
    b'"extra":{"name":"USDC","version":"2"},"maxTimeoutSeconds":300,'
    b'"network":"eip155:84532","payTo":"0xcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","scheme":"exact"}'
)


def test_an_offer_round_trips_to_the_same_wire() -> None:
    offer = Offer.from_wire(OFFER_WIRE)
    assert offer.pay_to == OFFER_WIRE["payTo"] and offer.max_timeout_seconds == 300
    assert offer.to_wire() == OFFER_WIRE
    assert list(offer.to_wire()) == list(OFFER_WIRE)  # the published key order too
    assert protocol.canonical_json(offer.to_wire()) == OFFER_VECTOR


@pytest.mark.parametrize(
    "broken",
    [
        {**OFFER_WIRE, "maxTimeoutSeconds": "300"},
        {**OFFER_WIRE, "extra": None},
        {k: v for k, v in OFFER_WIRE.items() if k != "payTo"},
        {**OFFER_WIRE, "unknown": 1},
        [OFFER_WIRE],
    ],
)
def test_a_bad_offer_is_malformed(broken: object) -> None:
    with pytest.raises(MalformedPayment) as error:
        Offer.from_wire(broken)
    assert error.value.reason == "malformed_payment"
