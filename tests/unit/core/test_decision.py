"""The decision without servers: every pre-ledger check, in order, with its typed reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.core import decision, protocol, receipts
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    InsufficientFunds,
    InvalidInvoice,
    InvalidSignature,
    InvoiceExpired,
    InvoiceMismatch,
    LedgerUnavailable,
    MalformedPayment,
    PaymentError,
)
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import Price

NOW = 1_763_711_000
GATEWAY = Gateway(Identity.generate(), b"k" * 32)
PRICE = Price("atlas", 250_000, Asset("USDF", 6), "Atlas")
WALLET = Identity.generate()
REQUEST = Request("GET", "/api/atlas", host="api.example", scheme="https")


def challenge() -> dict[str, Any]:
    return decision.invoice(REQUEST, PRICE, GATEWAY, NOW)


def paid(terms: dict[str, Any], request: Request = REQUEST) -> Request:
    proof = protocol.encode_header(protocol.sign_proof(terms, WALLET))
    return Request(request.method, request.path, request.host, request.scheme, proof)


def test_invoice_is_stateless_and_complete() -> None:
    invoice = challenge()
    assert invoice["resource"] == "GET /api/atlas"
    assert (invoice["amount"], invoice["amount_atomic"]) == ("0.25", "250000")
    assert invoice["payee"] == GATEWAY.payee
    assert invoice["expires_at"] == NOW + GATEWAY.invoice_ttl
    assert invoice["facilitator_url"] == "https://api.example/.well-known/x402"
    assert protocol.invoice_matches(GATEWAY.invoice_secret, invoice, invoice["invoice_id"])
    assert challenge()["nonce"] != invoice["nonce"]


def test_a_paid_challenge_verifies() -> None:
    proof = decision.verify_payment(paid(challenge()), PRICE, GATEWAY, NOW)
    assert proof.payer == WALLET.public_key and not proof.is_direct


def test_a_direct_payment_verifies() -> None:
    invoice = challenge()
    del invoice["invoice_id"]
    assert decision.verify_payment(paid(invoice), PRICE, GATEWAY, NOW).is_direct


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"resource": "GET /api/other"}, InvoiceMismatch),
        ({"asset": "EURF"}, InvoiceMismatch),
        ({"amount": "0.24"}, InvoiceMismatch),
        ({"amount": "0.2500001"}, MalformedPayment),  # more decimals than the asset has
        ({"amount": "-0.25"}, MalformedPayment),
        ({"payee": "gw_other"}, InvoiceMismatch),
        ({"expires_at": NOW - 1}, InvoiceExpired),
        ({"invoice_id": "inv_forged"}, InvalidInvoice),
        ({"invoice_id": "inv_\u00e9"}, InvalidInvoice),  # non-ASCII: found by atheris
        ({"expires_at": NOW + 10_000}, InvalidInvoice),  # a longer life breaks the MAC
        ({"nonce": "n_" + "z" * 22}, InvalidInvoice),
    ],
)
def test_each_altered_field_is_refused(change: dict[str, Any], error: type[PaymentError]) -> None:
    with pytest.raises(error):
        decision.verify_payment(paid({**challenge(), **change}), PRICE, GATEWAY, NOW)


def test_amounts_compare_exactly_not_textually() -> None:
    terms = {**challenge(), "amount": "0.250000"}
    terms["invoice_id"] = protocol.invoice_id(GATEWAY.invoice_secret, terms)
    assert decision.verify_payment(paid(terms), PRICE, GATEWAY, NOW)


def test_direct_proofs_may_not_live_longer_than_the_window() -> None:
    terms = {**challenge(), "expires_at": NOW + GATEWAY.max_direct_ttl + 1}
    del terms["invoice_id"]
    with pytest.raises(InvoiceExpired):
        decision.verify_payment(paid(terms), PRICE, GATEWAY, NOW)


def test_signature_must_match_payer() -> None:
    signed = protocol.sign_proof(challenge(), Identity.generate())
    signed["payer"] = WALLET.public_key
    request = Request("GET", "/api/atlas", proof_header=protocol.encode_header(signed))
    with pytest.raises(InvalidSignature):
        decision.verify_payment(request, PRICE, GATEWAY, NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1],  # flipped bit
        lambda s: s + "AA",  # wrong length
        lambda s: s[:-1] + chr(ord(s[-1]) + 1),  # non-canonical trailing bits
    ],
)
def test_signature_malleations_are_refused(mutate: Any) -> None:
    signed = protocol.sign_proof(challenge(), WALLET)
    signed["signature"] = mutate(signed["signature"])
    request = Request("GET", "/api/atlas", proof_header=protocol.encode_header(signed))
    with pytest.raises(InvalidSignature):
        decision.verify_payment(request, PRICE, GATEWAY, NOW)


@pytest.mark.parametrize("payer", ["", "abc", "A" * 44, "\uff21" * 43])  # fullwidth lookalikes
def test_payer_must_be_a_32_byte_key(payer: str) -> None:
    signed = protocol.sign_proof(challenge(), WALLET)
    signed["payer"] = payer
    request = Request("GET", "/api/atlas", proof_header=protocol.encode_header(signed))
    with pytest.raises(MalformedPayment):
        decision.verify_payment(request, PRICE, GATEWAY, NOW)


def test_denial_402_carries_a_fresh_invoice_and_the_v2_header() -> None:
    denial = decision.deny(InvoiceMismatch("moved"), REQUEST, PRICE, GATEWAY, NOW)
    body = json.loads(denial.body)
    assert (denial.status, denial.reason, body["error"]) == (
        402,
        "invoice_mismatch",
        "invoice_mismatch",
    )
    assert body["x402"]["invoice_id"] == denial.invoice_id
    headers = dict(denial.headers)
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    required = protocol.decode_header(headers["payment-required"])
    assert required["accepts"][0]["extra"] == body["x402"]
    assert required["resource"]["url"] == "https://api.example/api/atlas"


def test_insufficient_funds_reports_the_balance_as_a_decimal() -> None:
    denial = decision.deny(InsufficientFunds("low", balance=100_000), REQUEST, PRICE, GATEWAY, NOW)
    assert json.loads(denial.body)["balance"] == "0.1" and denial.balance == "0.1"


def test_ledger_unavailable_is_503_with_retry_after_and_no_invoice() -> None:
    denial = decision.deny(LedgerUnavailable("down"), REQUEST, PRICE, GATEWAY, NOW)
    assert denial.status == 503
    assert dict(denial.headers)["retry-after"] == "1"
    assert "x402" not in json.loads(denial.body)


def test_a_debit_receipt_is_signed_with_the_balance_left() -> None:
    proof = decision.verify_payment(paid(challenge()), PRICE, GATEWAY, NOW)
    record = receipts.debit_record(proof, PRICE.asset, PRICE.amount, "atlas", GATEWAY.payee, NOW)
    entry = {**record, "receipt_id": "rcpt_1", "balance": 750_000}
    receipt = protocol.sign_receipt(
        receipts.body(WALLET.public_key, entry, PRICE.asset), GATEWAY.identity
    )
    # Settlement re-derives it from the stream's strings: the same bytes, the same signature.
    stored = {name: str(value) for name, value in entry.items()}
    assert (
        protocol.sign_receipt(
            receipts.body(WALLET.public_key, stored, PRICE.asset), GATEWAY.identity
        )
        == receipt
    )
    allowed = decision.carrying(receipt)
    assert (receipt["amount"], receipt["balance"], receipt["receipt_id"]) == (
        "0.25",
        "0.75",
        "rcpt_1",
    )
    assert protocol.verify_receipt(receipt, {GATEWAY.payee: GATEWAY.identity.public_key})
    assert dict(allowed.upstream_headers) == {
        "x-x402-payer": WALLET.public_key,
        "x-x402-amount": "0.25",
        "x-x402-receipt-id": "rcpt_1",
    }
    assert protocol.decode_header(dict(allowed.response_headers)["payment-response"]) == receipt


# -- decision lines bounded in bytes -------------------------------------------------------


@pytest.mark.parametrize("char", ["x", "é", "€", "😀"])  # 1, 2, 3 and 4 bytes of UTF-8
def test_a_long_value_is_clipped_to_the_byte_limit_and_marked(char: str) -> None:
    value = "/api/" + char * 60_000
    short = decision.clipped(value)
    assert short is not None and short.endswith(decision.ELLIPSIS)
    assert len(short.encode()) <= decision.FIELD_BYTES
    assert value.startswith(short[:-1])  # a prefix, no character cut in half
    assert len(short.encode()) > decision.FIELD_BYTES - 4  # and as much of it as fits


def test_a_value_within_the_limit_is_kept() -> None:
    assert decision.clipped("x" * decision.FIELD_BYTES) is None
    assert decision.clipped("é" * (decision.FIELD_BYTES // 2)) is None
    assert decision.clipped("é" * (decision.FIELD_BYTES // 2 + 1)) is not None


def test_a_line_names_the_fields_it_clipped() -> None:
    entry: dict[str, Any] = {
        "method": "G" * 5000,
        "path": "/" + "p" * 60_000,
        "request_id": "r" * 300,
        "route": "atlas",
        "status": 402,
        "payer": None,
    }
    decision.bound(entry)
    assert entry["truncated"] == ["method", "path", "request_id"]
    assert (entry["route"], entry["status"], entry["payer"]) == ("atlas", 402, None)
    assert all(len(entry[k].encode()) <= decision.FIELD_BYTES for k in entry["truncated"])
    short = {"path": "/api/atlas", "method": "GET"}
    decision.bound(short)
    assert short == {"path": "/api/atlas", "method": "GET"}  # no marker when nothing is cut


def test_the_request_host_is_the_trusted_proxys_forwarded_host() -> None:
    """X-Forwarded-Host only behind trusted proxies (the entry the nearest one wrote), and
    only a plain host[:port]; else the request's own Host."""
    assert decision.request_host("inner:8080", "api.example", 0) == "inner:8080"
    assert decision.request_host("inner:8080", None, 1) == "inner:8080"
    assert decision.request_host("inner:8080", "api.example", 1) == "api.example"
    assert (
        decision.request_host("inner:8080", "spoof.example, api.example:8443", 1)
        == "api.example:8443"
    )
    assert decision.request_host("inner:8080", "edge.example, api.example", 2) == "edge.example"
    assert decision.request_host("inner:8080", "a.example", 5) == "a.example"
    assert decision.request_host("inner:8080", "[::1]:443", 1) == "[::1]:443"
    for odd in ("evil.example/x", "user@evil.example", "a b", "", "evil.example:99999999"):
        assert decision.request_host("inner:8080", odd, 1) == "inner:8080", odd
