"""Key rotation, the pure parts: the key set, payments to a previous payee, batches signed
by the key that signed their receipts, bundles checked with the published key set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import batches, bundles, decision, protocol, receipts, vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import InvoiceMismatch, KeySetError, SettlementError
from sidecar.core.identity import (
    Identity,
    KeySet,
    load_signing_key,
    public_key_set,
    published_key_set,
)
from sidecar.core.money import Asset
from sidecar.core.pricing import Price

NOW = 1_763_711_000
OLD, NEW = Identity.generate(), Identity.generate()
ROTATED = Gateway(NEW, b"k" * 32, previous=(OLD,))
PRICE = Price("atlas", 250_000, Asset("USDF", 6), "Atlas")
ASSETS = {"USDF": Asset("USDF", 6)}
WALLET = Identity.generate()
REQUEST = Request("GET", "/api/atlas", host="api.example", scheme="https")


def test_the_key_set_names_each_key_by_its_kid() -> None:
    keys = KeySet(NEW, (OLD,))
    assert keys.public_keys() == {NEW.kid: NEW.public_key, OLD.kid: OLD.public_key}
    assert keys.signer(OLD.kid) is OLD and keys.signer(NEW.kid) is NEW
    assert keys.kids == ROTATED.payees == {NEW.kid, OLD.kid}
    with pytest.raises(KeyError):
        keys.signer(Identity.generate().kid)


def test_a_key_twice_in_the_set_is_refused() -> None:
    twin = Identity.from_seed_text(OLD.seed_text)
    with pytest.raises(KeySetError, match=f"{OLD.kid} appears twice") as raised:
        KeySet(NEW, (OLD, twin))
    assert raised.value.reason == "duplicate_kid"


def test_signing_key_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "old.key"
    OLD.save(path)
    assert load_signing_key(path, "previous").kid == OLD.kid
    os.chmod(path, 0o400)
    assert load_signing_key(path, "previous").kid == OLD.kid

    cases: list[tuple[Path, str, str]] = [(tmp_path / "none.key", "key_unreadable", "cannot")]
    os.chmod(path, 0o640)  # one rule for every key file: the owner's only (check_private)
    cases.append((path, "key_mode", "mode 0640: others may read it"))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not-a-key-but-secret")
    garbage.chmod(0o600)
    cases.append((garbage, "key_malformed", "not an Ed25519 private key"))
    cases.append((tmp_path, "key_unreadable", "not a regular file"))
    for where, reason, message in cases:
        with pytest.raises(KeySetError, match=message) as raised:
            load_signing_key(where, "config previous_signing_key_files[0]")
        assert raised.value.reason == reason
        assert str(raised.value).startswith("config previous_signing_key_files[0]: ")
        assert "not-a-key-but-secret" not in str(raised.value)


def test_a_published_key_set_must_name_each_key_by_its_id() -> None:
    document = {"keys": [{"kid": k.kid, "public_key": k.public_key} for k in (NEW, OLD)]}
    assert published_key_set(document) == KeySet(NEW, (OLD,)).public_keys()
    assert public_key_set([f" {OLD.public_key}\n"]) == {OLD.kid: OLD.public_key}
    lying = {"keys": [{"kid": NEW.kid, "public_key": OLD.public_key}]}
    bad_documents: list[dict[str, Any]] = [lying, {"keys": []}, {"keys": [{"kid": "x"}]}, {}]
    for bad in bad_documents:
        with pytest.raises(ValueError):
            published_key_set(bad)


def direct(payee: str) -> protocol.Proof:
    terms = protocol.direct_terms("GET /api/atlas", "USDF", "0.25", payee, NOW + 60)
    proof = protocol.encode_header(protocol.sign_proof(terms, WALLET))
    request = Request("GET", "/api/atlas", "api.example", "https", proof)
    return decision.verify_payment(request, PRICE, ROTATED, NOW)


def test_after_a_rotation_both_payees_are_paid_and_invoices_name_the_new_one() -> None:
    assert decision.invoice(REQUEST, PRICE, ROTATED, NOW)["payee"] == NEW.kid
    assert direct(NEW.kid).payee == NEW.kid
    assert direct(OLD.kid).payee == OLD.kid  # an agent with the old discovery document
    with pytest.raises(InvoiceMismatch, match="payee"):
        direct(Identity.generate().kid)
    # Each payment's receipt is signed by its payee's key; anything else by the current.
    assert ROTATED.signer(OLD.kid) is OLD and ROTATED.signer(NEW.kid) is NEW
    assert ROTATED.signer("") is NEW


def test_the_grace_period_ends_proofs_to_the_previous_payee_not_its_channels() -> None:
    ending = Gateway(NEW, b"k" * 32, previous=(OLD,), previous_until=NOW + 10)
    assert ending.pays(OLD.kid, NOW + 10) and ending.pays(NEW.kid, NOW + 11)
    assert not ending.pays(OLD.kid, NOW + 11)
    assert not ending.pays(Identity.generate().kid, NOW)
    assert ending.payees == {OLD.kid, NEW.kid}  # vouchers: a channel works until closed
    assert ending.signer(OLD.kid) is OLD  # and the old key still signs what it was paid


def test_a_voucher_for_the_previous_payee_verifies() -> None:
    fields = {
        "channel_id": "ch_rotation",
        "sequence": 1,
        "cumulative": "0.25",
        "resource": "GET /api/atlas",
        "asset": "USDF",
    }
    for payee in (OLD.kid, NEW.kid):
        voucher = vouchers.voucher_from(vouchers.sign_voucher({**fields, "payee": payee}, WALLET))
        assert vouchers.verify_voucher(voucher, REQUEST, PRICE, ROTATED) == 250_000
    stranger = vouchers.sign_voucher({**fields, "payee": Identity.generate().kid}, WALLET)
    with pytest.raises(InvoiceMismatch):
        vouchers.verify_voucher(vouchers.voucher_from(stranger), REQUEST, PRICE, ROTATED)


def entry(n: int, payee: Identity) -> tuple[str, dict[str, str]]:
    fields = {
        "receipt_id": f"rcpt_{n}",
        "invoice_id": "",
        "nonce": f"n_{n:022d}",
        "payee": payee.kid,
        "resource": "GET /api/atlas",
        "route": "atlas",
        "asset": "USDF",
        "amount": "250000",
        "balance": str(10_000_000 - n * 250_000),
        "issued_at": str(NOW + n),
    }
    return f"{(NOW + n) * 1000}-0", fields


def issued(payer: str, fields: dict[str, str], key: Identity) -> dict[str, Any]:
    """The receipt the agent got in the response headers, signed by `key` then."""
    return protocol.sign_receipt(receipts.body(payer, fields, ASSETS["USDF"]), key)


def build(entries: list[tuple[str, dict[str, str]]], keys: KeySet, seq: int = 1) -> batches.Batch:
    return batches.build_batch(WALLET.public_key, "0-0", seq, entries, ASSETS, keys)


def test_settled_after_a_rotation_receipts_keep_the_key_that_signed_them() -> None:
    before = [entry(n, OLD) for n in range(3)]  # paid (and settled later) before rotation
    batch = build(before, KeySet(NEW, (OLD,)))
    # The very bytes the agent got: re-signed by the old key, not the current one.
    assert batch.receipts == [issued(WALLET.public_key, f, OLD) for _i, f in before]
    assert batch.manifest["kid"] == OLD.kid
    assert batches.verify_manifest(batch.manifest, OLD.public_key)
    # Built before the rotation (crash, rerun after it): the same batch, byte for byte.
    assert build(before, KeySet(OLD)).manifest == batch.manifest

    after = build([entry(n, NEW) for n in range(3, 5)], KeySet(NEW, (OLD,)), seq=2)
    assert after.manifest["kid"] == NEW.kid and after.receipts[0]["kid"] == NEW.kid


def test_a_receipt_paid_to_a_key_dropped_from_the_set_is_not_settled() -> None:
    with pytest.raises(SettlementError, match=r"rcpt_0: paid to .* previous_signing_key_files"):
        build([entry(0, OLD)], KeySet(NEW))


def bundle(batch_list: list[batches.Batch], current: Identity) -> dict[str, Any]:
    items = [
        item
        for batch in batch_list
        for item in bundles.entries(batch.id, batch.receipts, batch.tree, lambda _r: True)
    ]
    manifests = [batch.manifest for batch in batch_list]
    return bundles.bundle(manifests, items, {"payer": WALLET.public_key}, NOW + 99, current)


def test_a_bundle_across_a_rotation_verifies_with_the_published_key_set() -> None:
    keys = KeySet(NEW, (OLD,))
    old = build([entry(n, OLD) for n in range(3)], keys)
    new = batches.build_batch(
        WALLET.public_key, old.manifest["last"], 2, [entry(n, NEW) for n in range(3, 5)],
        ASSETS, keys,
    )  # fmt: skip
    document = bundle([old, new], NEW)
    verdict = bundles.verify_bundle(document, keys.public_keys())
    assert verdict.ok and (verdict.receipts, verdict.batches) == (5, 2), verdict.problems

    # With the current key alone, what the previous key signed is named, nothing else.
    problems = bundles.verify_bundle(document, NEW.public_key).problems
    assert problems == [
        f"batch {old.id}: signed by {OLD.kid!r}, not a key of the set ({NEW.kid})",
        *(
            f"receipt rcpt_{n}: signed by {OLD.kid!r}, not a key of the set ({NEW.kid})"
            for n in range(3)
        ),
    ]
