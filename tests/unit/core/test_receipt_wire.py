"""The signed receipt as a typed value: it round-trips to the same wire, so receipts the
gateway signed before the type still verify and rebuild the same Merkle leaves (the
vectors were signed by the dict-based code before the type)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sidecar.core import batches, protocol, receipts
from sidecar.core.errors import MalformedReceipt
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.protocol import Invoice, Proof
from sidecar.core.receipts import Receipt


def _identity(first: int) -> Identity:
    seed = base64.urlsafe_b64encode(bytes(range(first, first + 32))).rstrip(b"=")
    return Identity.from_seed_text(seed.decode())


WALLET, GATEWAY = _identity(0), _identity(1)
USDF = Asset("USDF", 6)
PROOF = Proof.sign(
    Invoice("n_" + "a" * 22, "GET /api", "USDF", "0.25", GATEWAY.kid, 1_763_712_000), WALLET
)
ENTRY = {
    **receipts.debit_record(PROOF, USDF, 250_000, "api", GATEWAY.kid, 1_763_711_000),
    "receipt_id": "rcpt_" + "c" * 22,
    "balance": 750_000,
}
SETTLED = {
    "transaction": "0x" + "ab" * 32,
    "network": "eip155:84532",
    "token": "0x" + "12" * 20,
    "nonce": "0x" + "34" * 32,
}
# Receipt headers signed by the code before the typed value (HEAD 1e13334).
DEBIT_VECTOR = (
    "eyJhbW91bnQiOiIwLjI1IiwiYXNzZXQiOiJVU0RGIiwiYmFsYW5jZSI6IjAuNzUiLCJpbnZvaWNlX2lkIjoiIiwi"
    "aXNzdWVkX2F0IjoxNzYzNzExMDAwLCJraWQiOiJnd19aYllHYzlidGlFdndIQ3dpIiwibm9uY2UiOiJuX2FhYWFh"
    "YWFhYWFhYWFhYWFhYWFhYWEiLCJwYXllZSI6Imd3X1piWUdjOWJ0aUV2d0hDd2kiLCJwYXllciI6Imd3X1ZrZGFw"
    "MVJqUjB3Q2hkOWQiLCJyZWNlaXB0X2lkIjoicmNwdF9jY2NjY2NjY2NjY2NjY2NjY2NjY2NjIiwicmVzb3VyY2Ui"
    "OiJHRVQgL2FwaSIsInNpZ25hdHVyZSI6InhGdXBXbjk3cHhZMFlEU1BFelRMRXlpNU14dXp0aEFmMDN4a0NTeGdj"
    "bWNGbDc2bGtTMUw1Mlo5ZHJiNzVFUFhza2NXdV9WRXI5djNSWUZPajYyNkJBIiwic3VjY2VzcyI6dHJ1ZSwidmVy"
    "c2lvbiI6ImZ0aC14NDAyLzIuMCJ9"
)
HOLD_VECTOR = (
    "eyJhbW91bnQiOiIwLjI1IiwiYXNzZXQiOiJVU0RGIiwiYmFsYW5jZSI6IjAuNzUiLCJoZWxkIjoiMC40IiwiaW52"
    "b2ljZV9pZCI6IiIsImlzc3VlZF9hdCI6MTc2MzcxMTAwMCwia2lkIjoiZ3dfWmJZR2M5YnRpRXZ3SEN3aSIsIm5v"
    "bmNlIjoibl9hYWFhYWFhYWFhYWFhYWFhYWFhYWFhIiwicGF5ZWUiOiJnd19aYllHYzlidGlFdndIQ3dpIiwicGF5"
    "ZXIiOiJnd19Wa2RhcDFSalIwd0NoZDlkIiwicmVjZWlwdF9pZCI6InJjcHRfY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
    "YyIsInJlc291cmNlIjoiR0VUIC9hcGkiLCJzaWduYXR1cmUiOiJaSnZTNUItSmhtYU1OLXl6MzQzdzRyUFdSRWNn"
    "WlVfcFZWQUdhcHUyXzNheE94a2FkNWhsRkNIUGY3Q05aZEJOeWRWV2NkQUg2ZTd2UUFJNDJWWFBEUSIsInN1Y2Nl"
    "c3MiOnRydWUsInVuaXRzIjo1LCJ2ZXJzaW9uIjoiZnRoLXg0MDIvMi4wIn0="
)
EXACT_VECTOR = (
    "eyJhbW91bnQiOiIwLjI1IiwiYXNzZXQiOiJVU0RGIiwiaXNzdWVkX2F0IjoxNzYzNzExMDAwLCJraWQiOiJnd19a"
    "YllHYzlidGlFdndIQ3dpIiwibmV0d29yayI6ImVpcDE1NTo4NDUzMiIsIm5vbmNlIjoiMHgzNDM0MzQzNDM0MzQz"
    "NDM0MzQzNDM0MzQzNDM0MzQzNDM0MzQzNDM0MzQzNDM0MzQzNDM0MzQzNDM0MzQzNDM0IiwicGF5ZWUiOiJnd19a"
    "YllHYzlidGlFdndIQ3dpIiwicGF5ZXIiOiIweDU2NTY1NjU2NTY1NjU2NTY1NjU2NTY1NjU2NTY1NjU2NTY1NjU2"
    "NTYiLCJyZWNlaXB0X2lkIjoicmNwdF9kZGRkZGRkZGRkZGRkZGRkZGRkZGRkIiwicmVzb3VyY2UiOiJHRVQgL2Fw"
    "aSIsInNjaGVtZSI6ImV4YWN0Iiwic2lnbmF0dXJlIjoiMGhSVXgtZXlIOEs1ZlhxUjBSWEt0TTFQSnktUnloSHEw"
    "Xzd2amlLUk1fOXV0MGlEaDBSNmdpVzZ1RVByWUIzMzAwZjM3Vk1md1VVMlpMNHpuak1tQUEiLCJzdWNjZXNzIjp0"
    "cnVlLCJ0b2tlbiI6IjB4MTIxMjEyMTIxMjEyMTIxMjEyMTIxMjEyMTIxMjEyMTIxMjEyMTIxMiIsInRyYW5zYWN0"
    "aW9uIjoiMHhhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFi"
    "YWJhYmFiIiwidmVyc2lvbiI6ImZ0aC14NDAyLzIuMCJ9"
)


def _debit() -> dict[str, Any]:
    return receipts.body(WALLET.kid, ENTRY, USDF)


def _hold() -> dict[str, Any]:
    return receipts.body(WALLET.kid, {**ENTRY, **receipts.hold_extra(400_000, 5)}, USDF)


def _exact() -> dict[str, Any]:
    payer, rid = "0x" + "56" * 20, "rcpt_" + "d" * 22
    return receipts.exact_body(
        payer, "GET /api", USDF, 250_000, SETTLED, rid, GATEWAY.kid, 1_763_711_000
    )


BODIES = [(_debit, DEBIT_VECTOR), (_hold, HOLD_VECTOR), (_exact, EXACT_VECTOR)]


@pytest.mark.parametrize(("build", "vector"), BODIES)
def test_a_signed_receipt_has_the_bytes_it_had_before_the_type(build: Any, vector: str) -> None:
    receipt = Receipt.sign(build(), GATEWAY)
    assert protocol.encode_header(receipt.to_wire()) == vector
    assert receipt.to_wire() == protocol.sign_receipt(build(), GATEWAY)  # the dict path
    assert protocol.signed_receipt(build(), GATEWAY)[1] == vector  # and the hot path's


@pytest.mark.parametrize(("build", "vector"), BODIES)
def test_a_receipt_round_trips_to_the_same_wire_and_verifies(build: Any, vector: str) -> None:
    wire = protocol.decode_header(vector)
    receipt = Receipt.from_wire(wire)
    assert receipt.to_wire() == wire
    assert protocol.canonical_json(receipt.to_wire()) == base64.b64decode(vector)
    assert (receipt.payer, receipt.amount, receipt.success) == (wire["payer"], "0.25", True)
    assert receipt.issued_at == 1_763_711_000 and receipt.kid == GATEWAY.kid
    keys = {GATEWAY.kid: GATEWAY.public_key}
    assert receipt.verify(keys) and protocol.verify_receipt(wire, keys)
    assert not receipt.verify({WALLET.kid: WALLET.public_key})  # not a key of the set
    assert not receipt.verify({GATEWAY.kid: WALLET.public_key})  # another key, same kid
    assert not Receipt.from_wire({**wire, "amount": "0.26"}).verify(keys)  # altered


def test_a_batch_leaf_is_the_receipt_of_the_response() -> None:
    receipt = Receipt.sign(_debit(), GATEWAY)
    assert batches.leaf(receipt.to_wire()) == base64.b64decode(DEBIT_VECTOR)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"issued_at": "1763711000"}, "no valid 'issued_at'"),
        ({"issued_at": True}, "no valid 'issued_at'"),
        ({"success": 1}, "no valid 'success'"),
        ({"amount": 0.25}, "no valid 'amount'"),
        ({"kid": None}, "no valid 'kid'"),
        ({"signature": None}, "no valid 'signature'"),
    ],
)
def test_a_malformed_receipt_is_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    wire = {**protocol.decode_header(DEBIT_VECTOR), **change}
    with pytest.raises(MalformedReceipt, match=message) as caught:
        Receipt.from_wire({k: v for k, v in wire.items() if v is not None})
    assert caught.value.reason == "malformed_receipt"
    with pytest.raises(MalformedReceipt, match="a JSON object"):
        Receipt.from_wire(["not", "an", "object"])
