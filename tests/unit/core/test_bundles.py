"""Evidence bundles verified offline: a good bundle verifies; each kind of tampering is
refused with the failure named (the end-to-end export is tests/test_evidence.py)."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from sidecar.core import batches, bundles, merkle, protocol
from sidecar.core.identity import Identity, KeySet
from sidecar.core.money import Asset

GATEWAY = Identity.generate()
PAYER = Identity.generate().public_key
ASSETS = {"USDF": Asset("USDF", 6)}


def stream(first: int, count: int) -> list[tuple[str, dict[str, str]]]:
    return [
        (
            f"{1_763_711_000_000 + n}-0",
            {
                "receipt_id": f"rcpt_{n}",
                "invoice_id": "",
                "nonce": f"n_{n:022d}",
                "payee": GATEWAY.kid,
                "resource": f"GET /api/v1/trade/verify/T-{n}",
                "asset": "USDF",
                "amount": "10000",
                "balance": str(1_000_000 - 10_000 * n),
                "issued_at": str(1_763_711_000 + n),
            },
        )
        for n in range(first, first + count)
    ]


def everything(_receipt: object) -> bool:
    return True


def make_bundle() -> dict[str, Any]:
    """Two batches of one payer (5 and 3 receipts), every receipt exported."""
    one = batches.build_batch(PAYER, "0-0", 1, stream(0, 5), ASSETS, KeySet(GATEWAY))
    two = batches.build_batch(PAYER, one.manifest["last"], 2, stream(5, 3), ASSETS, KeySet(GATEWAY))
    items = [
        *bundles.entries(one.id, one.receipts, one.tree, everything),
        *bundles.entries(two.id, two.receipts, two.tree, everything),
    ]
    query = {"payer": PAYER}
    return bundles.bundle([one.manifest, two.manifest], items, query, 1_763_712_000, GATEWAY)


@pytest.fixture
def bundle() -> dict[str, Any]:
    return make_bundle()


def problems(bundle: dict[str, Any]) -> list[str]:
    return bundles.verify_bundle(bundle, GATEWAY.public_key).problems


def test_a_good_bundle_verifies(bundle: dict[str, Any]) -> None:
    verdict = bundles.verify_bundle(bundle, GATEWAY.public_key)
    assert verdict.ok and verdict.problems == []
    assert (verdict.receipts, verdict.batches) == (8, 2)
    assert bundle["statement"]["receipts"] == [f"rcpt_{n}" for n in range(8)]


def test_only_the_chosen_receipts_are_entries_and_their_proofs_hold() -> None:
    batch = batches.build_batch(PAYER, "0-0", 1, stream(0, 5), ASSETS, KeySet(GATEWAY))
    chosen = bundles.entries(batch.id, batch.receipts, batch.tree, lambda r: r["nonce"][-1] in "13")
    assert [(e["receipt"]["receipt_id"], e["proof"]["index"]) for e in chosen] == [
        ("rcpt_1", 1),
        ("rcpt_3", 3),
    ]
    signed = bundles.bundle([batch.manifest], chosen, {}, 1, GATEWAY)
    assert bundles.verify_bundle(signed, GATEWAY.public_key).ok


def test_a_changed_amount_is_named(bundle: dict[str, Any]) -> None:
    bundle["receipts"][2]["receipt"]["amount"] = "0.001"
    assert problems(bundle) == [
        "receipt rcpt_2: gateway signature does not verify (altered)",
        f"receipt rcpt_2: Merkle proof does not lead to batch {bundle['batches'][0]['batch_id']}'s "
        "root (the receipt or its proof was altered, or the batch was forged)",
    ]


def test_a_dropped_receipt_is_named(bundle: dict[str, Any]) -> None:
    del bundle["receipts"][6]
    assert problems(bundle) == [
        "receipt rcpt_6: listed in the signed export statement but missing (dropped)"
    ]


def test_a_dropped_receipt_and_a_restated_list_are_named(bundle: dict[str, Any]) -> None:
    del bundle["receipts"][6]
    bundle["statement"]["receipts"].remove("rcpt_6")
    assert problems(bundle) == [
        f"export statement: signature does not verify with the key set ({GATEWAY.kid}) "
        "(the list of exported receipts was altered, or another key signed it)"
    ]


def test_an_added_receipt_is_named(bundle: dict[str, Any]) -> None:
    other = batches.build_batch(PAYER, "0-0", 1, stream(20, 1), ASSETS, KeySet(GATEWAY))
    bundle["batches"].append(other.manifest)
    bundle["receipts"] += bundles.entries(other.id, other.receipts, other.tree, everything)
    assert problems(bundle) == ["receipt rcpt_20: not in the signed export statement (added)"]


def test_a_forged_manifest_is_named(bundle: dict[str, Any]) -> None:
    # The forger rebuilds batch 1 without its first receipt and signs with its own key.
    forger = Identity.generate()
    manifest = bundle["batches"][0]
    leaves = [batches.leaf(item["receipt"]) for item in bundle["receipts"][1:5]]
    body = {k: v for k, v in manifest.items() if k != "signature"}
    body.update(merkle_root=merkle.MerkleTree(leaves).root.hex(), count=4)
    signature = forger.sign(batches.BATCH_DOMAIN + protocol.canonical_json(body))
    manifest.clear()
    manifest.update(body, signature=signature)

    found = problems(bundle)

    batch = manifest["batch_id"]
    assert found[0] == f"batch {batch}: manifest signature does not verify (forged or altered)"
    assert found[1:] == [
        f"receipt rcpt_{n}: Merkle proof does not lead to batch {batch}'s root "
        "(the receipt or its proof was altered, or the batch was forged)"
        for n in range(5)
    ]


def test_a_manifest_of_another_key_is_named(bundle: dict[str, Any]) -> None:
    bundle["batches"][1]["kid"] = "gw_other"
    batch = bundle["batches"][1]["batch_id"]
    assert problems(bundle) == [
        f"batch {batch}: signed by 'gw_other', not a key of the set ({GATEWAY.kid})"
    ]


def test_a_missing_batch_and_a_swapped_proof_are_named(bundle: dict[str, Any]) -> None:
    second = bundle["batches"].pop()["batch_id"]
    bundle["receipts"][0]["proof"], bundle["receipts"][1]["proof"] = (
        bundle["receipts"][1]["proof"],
        bundle["receipts"][0]["proof"],
    )
    found = problems(bundle)
    assert [p for p in found if "not in the bundle" in p] == [
        f"receipt rcpt_{n}: its batch {second} is not in the bundle" for n in (5, 6, 7)
    ]
    assert [p.split(":")[0] for p in found if "Merkle proof" in p] == [
        "receipt rcpt_0",
        "receipt rcpt_1",
    ]
    assert found[-1] == f"batch {second}: listed in the signed export statement but missing"


def test_the_wrong_key_fails_every_signature(bundle: dict[str, Any]) -> None:
    other = Identity.generate()
    verdict = bundles.verify_bundle(bundle, other.public_key)
    assert not verdict.ok
    assert len([p for p in verdict.problems if f"not a key of the set ({other.kid})" in p]) == 10
    # The right kid with another key's public key: every signature fails as such.
    forged = bundles.verify_bundle(bundle, {GATEWAY.kid: other.public_key})
    assert len([p for p in forged.problems if "gateway signature" in p]) == 8
    assert len([p for p in forged.problems if "manifest signature" in p]) == 2
    assert verdict.problems[0].startswith("export statement: signature does not verify")


@pytest.mark.parametrize("document", [[], {"format": "other"}, "text", None])
def test_a_document_that_is_no_bundle_is_refused(document: Any) -> None:
    assert problems(document) == [f"not an evidence bundle (format is not {bundles.FORMAT!r})"]


def test_the_checks_do_not_change_the_bundle(bundle: dict[str, Any]) -> None:
    kept = copy.deepcopy(bundle)
    bundles.verify_bundle(bundle, GATEWAY.public_key)
    assert bundle == kept


@pytest.mark.parametrize(
    "text", ["", "abc", GATEWAY.public_key + "AAAA"], ids=["empty", "short", "long"]
)
def test_a_public_key_must_be_32_bytes(text: str) -> None:
    with pytest.raises(ValueError):
        bundles.parse_public_key(text)
    assert bundles.parse_public_key(f" {GATEWAY.public_key}\n") == GATEWAY.public_key


# -- against the chain's roots (check_anchors; the roots are read by tools/anchoring.py) --


def chain_roots(bundle: dict[str, Any]) -> dict[str, bytes | None]:
    """The roots a chain that anchored every batch of `bundle` holds."""
    return {m["batch_id"]: bytes.fromhex(m["merkle_root"]) for m in bundle["batches"]}


def test_anchor_key_is_the_sha256_of_the_batch_id() -> None:
    assert batches.anchor_key("bat_x") == hashlib.sha256(b"bat_x").digest()
    assert len(batches.anchor_key("bat_x")) == 32


def test_every_receipt_proves_against_the_roots_on_chain(bundle: dict[str, Any]) -> None:
    assert bundles.anchored_batches(bundle) == [m["batch_id"] for m in bundle["batches"]]
    assert bundles.check_anchors(bundle, chain_roots(bundle)) == []


def test_an_unanchored_batch_names_each_of_its_receipts(bundle: dict[str, Any]) -> None:
    roots = chain_roots(bundle)
    second = bundle["batches"][1]["batch_id"]
    roots[second] = None
    found = bundles.check_anchors(bundle, roots)
    assert [p.reason for p in found] == ["not_anchored"] * 3
    assert found[0].message == f"receipt rcpt_5: its batch {second} is not anchored on chain"


def test_a_tampered_receipt_and_a_foreign_root_are_named(bundle: dict[str, Any]) -> None:
    bundle["receipts"][2]["receipt"]["amount"] = "0.02"
    roots = chain_roots(bundle)
    first = bundle["batches"][0]["batch_id"]
    assert [p.reason for p in bundles.check_anchors(bundle, roots)] == ["proof_mismatch"]
    roots[first] = bytes(range(32))  # the chain holds another root for batch 1
    found = [p.reason for p in bundles.check_anchors(bundle, roots)]
    assert found == ["root_mismatch"] + ["proof_mismatch"] * 5


def test_the_statement_names_the_anchor_contract() -> None:
    address = "0x" + "ab" * 20
    signed = bundles.bundle([], [], {}, 1, GATEWAY, address)
    assert bundles.anchor_contract(signed) == address
    assert bundles.verify_bundle(signed, GATEWAY.public_key).ok  # signed with the rest
    assert bundles.anchor_contract(make_bundle()) is None
    assert bundles.anchor_contract("not a bundle") is None
