"""Settlement batches, the pure part: receipts → Merkle root → signed manifest. No I/O.

A batch is built from one claimed range of a payer's receipt stream. Nothing in it depends
on the clock or the worker, so a batch built again from the same claim is the same bytes
and has the same id (`sidecar/ledger/settlement.py` claims, anchors and commits).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.core import merkle, receipts
from sidecar.core.errors import SettlementError
from sidecar.core.identity import Identity, KeySet, b64url, verify, verify_key
from sidecar.core.money import Asset
from sidecar.core.protocol import VERSION, canonical_json
from sidecar.core.receipts import Receipt

BATCH_DOMAIN = b"fth-x402/2.0 batch\n"
BATCH_TYPE = "settlement-batch"


def batch_id(payer: str, first: str, last: str) -> str:
    """Deterministic from the claimed range: a rebuilt batch keeps its id."""
    digest = hashlib.sha256(canonical_json({"payer": payer, "first": first, "last": last}))
    return "bat_" + b64url(digest.digest()[:16])


def anchor_key(batch: str) -> bytes:
    """The 32 bytes a batch is anchored under on chain (the BatchAnchor contract's key):
    SHA-256 of its id (UTF-8), so a verifier derives it from the manifest alone."""
    return hashlib.sha256(batch.encode("utf-8")).digest()


def signer(entry: Mapping[str, str], keys: KeySet) -> Identity:
    """The key that signed a receipt-stream entry's receipt: the key of its payee. After a
    rotation, an entry paid to a previous key is re-signed by that key, never the current
    one; a payee outside the key set is a SettlementError (keep a previous key configured
    until every receipt paid to it is settled)."""
    payee = entry.get("payee", "")
    try:
        return keys.signer(payee)
    except KeyError:
        raise SettlementError(
            f"receipt {entry.get('receipt_id')}: paid to {payee!r}, which is not a key of "
            "the gateway's key set (configure it in previous_signing_key_files)"
        ) from None


def signed_receipt(
    payer: str, entry: Mapping[str, str], assets: Mapping[str, Asset], keys: KeySet
) -> Receipt:
    """The receipt the agent got for a receipt-stream entry, re-derived and re-signed by
    the key that signed it (its payee's).

    Ed25519 signatures are deterministic: with the same gateway key this is, byte for
    byte, the receipt of the response headers (PROTOCOL.md §4).
    """
    asset = assets.get(entry.get("asset", ""))
    if asset is None:
        raise SettlementError(f"receipt {entry.get('receipt_id')}: unknown asset")
    try:
        body = receipts.body(payer, entry, asset)
    except (KeyError, ValueError) as exc:
        raise SettlementError(
            f"receipt {entry.get('receipt_id')}: malformed stream entry ({exc})"
        ) from None
    return Receipt.sign(body, signer(entry, keys))


def leaf(receipt: Mapping[str, Any]) -> bytes:
    """A batch's leaves are the signed receipts' canonical JSON (their wire)."""
    return canonical_json(receipt)


@dataclass(frozen=True)
class Batch:
    manifest: dict[str, Any]  # signed
    receipts: list[dict[str, Any]]  # signed, on the wire, in leaf order
    stream_ids: list[str]
    tree: merkle.MerkleTree = field(repr=False)

    @property
    def id(self) -> str:
        return str(self.manifest["batch_id"])


def build_batch(
    payer: str,
    previous: str,
    seq: int,
    entries: Sequence[tuple[str, Mapping[str, str]]],
    assets: Mapping[str, Asset],
    keys: KeySet,
) -> Batch:
    """The signed manifest of one claimed range. Deterministic: no clock, no worker id,
    nor which key is current: a claim holds the receipts of one payee (settle_claim.lua
    ends it where the payee changes), and that payee's key signs the manifest too, so a
    batch rebuilt after a rotation is the same bytes."""
    signed = [signed_receipt(payer, fields, assets, keys) for _id, fields in entries]
    receipts = [r.to_wire() for r in signed]
    gateway = signer(entries[0][1], keys)
    tree = merkle.MerkleTree([leaf(r) for r in receipts])
    totals: dict[str, int] = {}
    for _id, fields in entries:
        totals[fields["asset"]] = totals.get(fields["asset"], 0) + int(fields["amount"])
    first, last = entries[0][0], entries[-1][0]
    body = {
        "version": VERSION,
        "type": BATCH_TYPE,
        "batch_id": batch_id(payer, first, last),
        "payer": payer,
        "seq": seq,
        "previous": previous,  # the cursor before this batch: batches chain per payer
        "first": first,
        "last": last,
        "count": len(receipts),
        "totals": {code: str(amount) for code, amount in sorted(totals.items())},
        "merkle_alg": merkle.ALGORITHM,
        "merkle_root": tree.root.hex(),
        "closed_at": max(r.issued_at for r in signed),
        "kid": gateway.kid,
    }
    manifest = {**body, "signature": gateway.sign(BATCH_DOMAIN + canonical_json(body))}
    return Batch(manifest, receipts, [stream_id for stream_id, _f in entries], tree)


def verify_manifest(manifest: Mapping[str, Any], public_key: str) -> bool:
    """The gateway's signature on a batch manifest, with its public key (base64url)."""
    signature = manifest.get("signature")
    if not isinstance(signature, str):
        return False
    try:
        key = verify_key(public_key)
    except ValueError:
        return False
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return verify(key, BATCH_DOMAIN + canonical_json(body), signature)
