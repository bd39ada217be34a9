"""Wire encodings: canonical bytes, strict proof parsing, invoice MACs, receipts."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import protocol
from sidecar.core.errors import (
    MalformedPayment,
    PaymentError,
    UnsupportedScheme,
    UnsupportedVersion,
)
from sidecar.core.identity import Identity

SECRET = b"s" * 32
WALLET = Identity.from_seed_text(base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode())


def terms(**changes: Any) -> dict[str, Any]:
    base = {
        "version": protocol.VERSION,
        "scheme": protocol.SCHEME,
        "nonce": "n_" + "a" * 22,
        "resource": "GET /api",
        "asset": "USDF",
        "amount": "0.25",
        "payee": "gw_x",
        "expires_at": 1_763_712_000,
    }
    return {**base, **changes}


def header(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)


@given(st.dictionaries(st.text(), json_values))
def test_canonical_json_is_order_independent_and_round_trips(obj: dict[str, Any]) -> None:
    reordered = dict(reversed(list(obj.items())))
    encoded = protocol.canonical_json(obj)
    assert encoded == protocol.canonical_json(reordered)
    assert json.loads(encoded) == obj


json_floats = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
ENCODER_OPTIONS: tuple[dict[str, Any], ...] = (
    {},
    {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False},
    {"separators": (",", ":")},
)


@pytest.mark.parametrize("options", ENCODER_OPTIONS)
@given(obj=json_floats)
def test_kept_encoder_writes_what_json_writes(options: dict[str, Any], obj: Any) -> None:
    assert protocol.json_encoder(**options)(obj) == json.JSONEncoder(**options).encode(obj)


def test_kept_encoder_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError):
        protocol.json_encoder()({"a": object()})


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert protocol.canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_signed_proof_parses_and_signature_covers_every_field() -> None:
    signed = protocol.sign_proof({**terms(), "invoice_id": "inv_1"}, WALLET)
    proof = protocol.parse_proof(protocol.encode_header(signed), 4096)
    assert proof.payer == WALLET.public_key and proof.invoice_id == "inv_1"
    unsigned = {k: v for k, v in signed.items() if k != "signature"}
    assert proof.signed_message == protocol.PROOF_DOMAIN + protocol.canonical_json(unsigned)


@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: base64.b64encode(raw).decode(),
        lambda raw: base64.b64encode(raw).decode().rstrip("="),
        lambda raw: base64.urlsafe_b64encode(raw).decode(),
        lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ],
)
def test_header_accepts_standard_and_urlsafe_base64_with_or_without_padding(encode: Any) -> None:
    raw = protocol.canonical_json(protocol.sign_proof(terms(), WALLET))
    assert protocol.parse_proof(encode(raw), 4096).nonce == terms()["nonce"]


def test_v2_envelope_is_unwrapped() -> None:
    envelope = {"x402Version": 2, "accepted": {}, "payload": protocol.sign_proof(terms(), WALLET)}
    assert protocol.parse_proof(header(envelope), 4096).is_direct


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b'{"version":"fth-x402/2.0","version":"fth-x402/2.0"}', MalformedPayment),  # duplicate key
        (b"\xff\xfe{}", MalformedPayment),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, MalformedPayment),  # deep nesting
        (b'{"version": 1' + b"0" * 5000 + b"}", MalformedPayment),  # huge number
        (b"null", MalformedPayment),
        (b'{"version":"fth-x402/9"}', UnsupportedVersion),
        (b'{"version":"fth-x402/2.0","scheme":"x"}', UnsupportedScheme),
    ],
)
def test_hostile_json_gets_a_typed_reason(raw: bytes, error: type[PaymentError]) -> None:
    with pytest.raises(error):
        protocol.parse_proof(base64.b64encode(raw).decode(), 10**7)


def test_deep_nesting_is_refused_even_under_a_raised_recursion_limit() -> None:
    """py_ecc (loaded with web3 for the `exact` scheme) sets the recursion limit to 100,000;
    a deeply nested header must still be a typed refusal, not a crash of the worker."""
    probe = (
        "import base64, sys; sys.setrecursionlimit(100_000)\n"
        "from sidecar.core import protocol\n"
        "from sidecar.core.errors import MalformedPayment\n"
        "raw = b'[' * 100_000 + b']' * 100_000\n"
        "try:\n"
        "    protocol.parse_proof(base64.b64encode(raw).decode(), 10**7)\n"
        "except MalformedPayment as exc:\n"
        "    print(exc.reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "malformed_payment")


@pytest.mark.parametrize(
    "change",
    [
        {"expires_at": True},  # a bool is not an integer
        {"expires_at": "1763712000"},
        {"amount": 0.25},  # never a float
        {"nonce": "short"},
        {"payer": ""},
        {"extra": "field"},
        {"resource": "x" * 600},
    ],
)
def test_wrong_field_types_are_malformed(change: dict[str, Any]) -> None:
    obj = {**protocol.sign_proof(terms(), WALLET), **change}
    with pytest.raises(MalformedPayment):
        protocol.parse_proof(header(obj), 4096)


def test_missing_field_is_malformed() -> None:
    obj = protocol.sign_proof(terms(), WALLET)
    del obj["expires_at"]
    with pytest.raises(MalformedPayment, match="expires_at"):
        protocol.parse_proof(header(obj), 4096)


def test_oversized_header_is_refused_before_decoding() -> None:
    with pytest.raises(MalformedPayment, match="larger"):
        protocol.parse_proof("A" * 4097, 4096)


@pytest.mark.parametrize("field", protocol.INVOICE_MAC_FIELDS)
def test_invoice_mac_covers_every_field(field: str) -> None:
    original = terms()
    changed = {**original, field: 1 if field == "expires_at" else "other"}
    assert protocol.invoice_id(SECRET, original) != protocol.invoice_id(SECRET, changed)
    assert protocol.invoice_matches(SECRET, original, protocol.invoice_id(SECRET, original))
    assert not protocol.invoice_matches(SECRET, changed, protocol.invoice_id(SECRET, original))


def test_invoice_mac_depends_on_the_secret_and_has_128_bits() -> None:
    mac = protocol.invoice_id(SECRET, terms())
    assert mac != protocol.invoice_id(b"t" * 32, terms())
    assert len(base64.urlsafe_b64decode(mac.removeprefix("inv_") + "==")) == 16


def test_receipt_signature_verifies_and_detects_changes() -> None:
    gateway = Identity.generate()
    receipt = protocol.sign_receipt({"receipt_id": "rcpt_1", "amount": "0.25"}, gateway)
    keys = {gateway.kid: gateway.public_key}
    assert receipt["kid"] == gateway.kid
    assert protocol.verify_receipt(receipt, keys)
    assert not protocol.verify_receipt({**receipt, "amount": "0.26"}, keys)
    assert not protocol.verify_receipt(receipt, {gateway.kid: Identity.generate().public_key})
    assert not protocol.verify_receipt(receipt, {})


@given(st.dictionaries(st.text(), json_values))
def test_signed_receipt_is_sign_receipt_and_its_header(fields: dict[str, Any]) -> None:
    gateway = Identity.generate()
    receipt, header = protocol.signed_receipt(fields, gateway)
    assert receipt == protocol.sign_receipt(fields, gateway)
    assert header == protocol.encode_header(receipt)
    raw = base64.b64decode(header)
    if raw.count(b"[") + raw.count(b"{") > protocol.MAX_BRACKETS:  # decoding bounds nesting
        with pytest.raises(MalformedPayment):
            protocol.decode_header(header)
    elif "signature" not in fields:  # else sign_receipt signs that field too
        keys = {gateway.kid: gateway.public_key}
        assert protocol.verify_receipt(protocol.decode_header(header), keys)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"a": "\x00signature\x00"},
        {"a": {"signature": "\x00signature\x00"}},  # the mark twice: the plain way
        {"a": 1, "z": [{"signature": ""}]},
    ],
)
def test_signed_receipt_edges(fields: dict[str, Any]) -> None:
    gateway = Identity.generate()
    receipt, header = protocol.signed_receipt(fields, gateway)
    assert receipt == protocol.sign_receipt(fields, gateway)
    assert header == protocol.encode_header(receipt)
    assert protocol.verify_receipt(receipt, {gateway.kid: gateway.public_key})


def test_signed_receipt_of_a_real_receipt_body() -> None:
    gateway = Identity.generate()
    body = {"version": protocol.VERSION, "success": True, "receipt_id": "rcpt_1",
            "amount": "0.25", "balance": "1", "payer": "p", "issued_at": 1}  # fmt: skip
    receipt, header = protocol.signed_receipt(body, gateway)
    assert header == protocol.encode_header(protocol.sign_receipt(body, gateway))
    assert list(json.loads(base64.b64decode(header))) == sorted(receipt)


def test_nonces_and_receipt_ids_are_unique_and_long_enough() -> None:
    nonces = {protocol.new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert all(len(n) >= protocol.MIN_NONCE_CHARS for n in nonces)
