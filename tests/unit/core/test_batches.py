"""Settlement batches without Redis: a claimed range of stream entries → the signed
manifest, its Merkle root over the very receipts the agent got, and its id."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core import batches, merkle, protocol, receipts
from sidecar.core.errors import SettlementError
from sidecar.core.identity import Identity, KeySet
from sidecar.core.money import Asset

GATEWAY = Identity.generate()
PAYER = Identity.generate().public_key
ASSETS = {"USDF": Asset("USDF", 6), "EURF": Asset("EURF", 2)}


def entry(n: int, amount: int = 10_000, asset: str = "USDF") -> tuple[str, dict[str, str]]:
    """A debit's receipt-stream entry as Redis returns it: all strings."""
    fields = {
        "receipt_id": f"rcpt_{n}",
        "invoice_id": "",
        "nonce": f"n_{n:022d}",
        "payee": GATEWAY.kid,
        "resource": f"GET /api/v1/trade/verify/T-{n}",
        "route": "verify",
        "asset": asset,
        "amount": str(amount),
        "balance": str(1_000_000 - n * amount),
        "issued_at": str(1_763_711_000 + n),
    }
    return f"{1_763_711_000_000 + n}-0", fields


ENTRIES = [entry(n) for n in range(5)]


def build(entries: list[tuple[str, dict[str, str]]] = ENTRIES, **kw: Any) -> batches.Batch:
    args: dict[str, Any] = {"previous": "0-0", "seq": 1, **kw}
    return batches.build_batch(
        PAYER, args["previous"], args["seq"], entries, ASSETS, KeySet(GATEWAY)
    )


def test_the_manifest_says_what_the_batch_holds() -> None:
    batch = build(previous="1763710999999-0", seq=7)
    manifest = batch.manifest
    assert {k: manifest[k] for k in ("payer", "seq", "previous", "first", "last", "count")} == {
        "payer": PAYER,
        "seq": 7,
        "previous": "1763710999999-0",
        "first": ENTRIES[0][0],
        "last": ENTRIES[-1][0],
        "count": 5,
    }
    assert (manifest["version"], manifest["type"]) == (protocol.VERSION, batches.BATCH_TYPE)
    assert manifest["totals"] == {"USDF": "50000"}
    assert manifest["closed_at"] == 1_763_711_004  # the newest receipt's, not the clock's
    assert (manifest["kid"], manifest["merkle_alg"]) == (GATEWAY.kid, merkle.ALGORITHM)
    assert (
        batch.id == manifest["batch_id"] == batches.batch_id(PAYER, ENTRIES[0][0], ENTRIES[-1][0])
    )
    assert batch.stream_ids == [stream_id for stream_id, _f in ENTRIES]


def test_the_leaves_are_the_receipts_the_agent_got() -> None:
    batch = build()
    for (_id, fields), receipt in zip(ENTRIES, batch.receipts, strict=True):
        issued = protocol.sign_receipt(receipts.body(PAYER, fields, ASSETS["USDF"]), GATEWAY)
        assert receipt == issued
        assert protocol.verify_receipt(receipt, {GATEWAY.kid: GATEWAY.public_key})
    root = merkle.MerkleTree([protocol.canonical_json(r) for r in batch.receipts]).root
    assert batch.manifest["merkle_root"] == root.hex() == batch.tree.root.hex()
    for index, receipt in enumerate(batch.receipts):
        path = batch.tree.proof(index)
        assert merkle.verify(batches.leaf(receipt), index, len(ENTRIES), path, root)


def test_a_batch_built_again_is_the_same_bytes() -> None:
    assert build().manifest == build().manifest
    shorter = build(ENTRIES[:4])
    assert shorter.id != build().id
    assert shorter.manifest["merkle_root"] != build().manifest["merkle_root"]
    assert batches.batch_id(PAYER, "1-0", "2-0") != batches.batch_id(PAYER, "1-0", "3-0")
    assert batches.batch_id(PAYER, "1-0", "2-0").startswith("bat_")


def test_totals_are_per_asset_in_atomic_units() -> None:
    mixed = [entry(0), entry(1, amount=250, asset="EURF"), entry(2), entry(3, 5, "EURF")]
    assert build(mixed).manifest["totals"] == {"EURF": "255", "USDF": "20000"}


def test_the_manifest_signature_verifies_and_nothing_else_does() -> None:
    manifest = build().manifest
    assert batches.verify_manifest(manifest, GATEWAY.public_key)
    assert not batches.verify_manifest({**manifest, "count": 4}, GATEWAY.public_key)
    assert not batches.verify_manifest({**manifest, "merkle_root": "00" * 32}, GATEWAY.public_key)
    assert not batches.verify_manifest(manifest, Identity.generate().public_key)
    assert not batches.verify_manifest(manifest, "not a key")
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    assert not batches.verify_manifest(unsigned, GATEWAY.public_key)


def test_an_entry_in_an_unknown_asset_is_a_settlement_error() -> None:
    with pytest.raises(SettlementError, match="rcpt_1: unknown asset"):
        build([entry(0), entry(1, asset="XAU")])


@pytest.mark.parametrize(("field", "value"), [("amount", "ten"), ("issued_at", None)])
def test_a_malformed_entry_is_a_settlement_error(field: str, value: str | None) -> None:
    stream_id, fields = entry(1)
    if value is None:
        del fields[field]
    else:
        fields[field] = value
    with pytest.raises(SettlementError, match="rcpt_1: malformed stream entry"):
        build([entry(0), (stream_id, fields)])
