"""Evidence bundles: receipts with their Merkle proofs and signed batch manifests, checked
offline with nothing but the gateway's published key set.

This module exports a bundle from the ledger; `sidecar/core/bundles.py` describes its
format and verifies it (pure).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import bundles, merkle
from sidecar.core.batches import leaf, signed_receipt
from sidecar.core.errors import X402Error
from sidecar.core.identity import KeySet
from sidecar.core.money import Asset
from sidecar.ledger import keyspace, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.reports import stream_after


@dataclass(frozen=True)
class Query:
    receipt_id: str | None = None
    payer: str | None = None
    since: int | None = None  # issued_at >= since (unix seconds)
    until: int | None = None  # issued_at < until

    def matches(self, receipt: Mapping[str, Any]) -> bool:
        issued = int(receipt["issued_at"])
        return (
            (self.receipt_id is None or receipt["receipt_id"] == self.receipt_id)
            and (self.since is None or issued >= self.since)
            and (self.until is None or issued < self.until)
        )

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Export:
    bundle: dict[str, Any]
    unsettled: int  # receipts that matched but are in no committed batch yet
    expired: int = 0  # batches whose receipts left the ledger (receipt_retention_seconds)


async def export(
    ledger: Ledger,
    keys: KeySet,
    assets: Mapping[str, Asset],
    query: Query,
    anchor_contract: str | None = None,
) -> Export:
    """Collect every settled receipt the query matches, with its proof and manifest; the
    statement names `anchor_contract`, where the batches' roots are on chain."""
    if query.payer is not None:
        payers = [query.payer]
    else:
        payers = sorted([p async for p in ledger.scan_payers()])
    batches: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    unsettled = expired = 0
    for payer in payers:
        state: dict[str, str] = await ledger.call(ledger._redis.hgetall(keyspace.settlement(payer)))
        kept_from = state.get("trimmed", "0-0")  # receipts before it left the ledger
        for manifest in await settlement.payer_batches(ledger, payer):
            if stream_after(kept_from, manifest["first"]):
                expired += 1  # past retention: its manifest remains, its receipts do not
                continue
            chosen = await _batch_items(ledger, keys, assets, payer, manifest, query)
            if chosen:
                batches.append(manifest)
                items.extend(chosen)
        after = state.get("settled", "0-0")
        pending: list[tuple[str, dict[str, str]]] = await ledger.call(
            ledger._redis.xrange(keyspace.receipts(payer), min=f"({after}")
        )
        for _id, fields in pending:
            receipt = {"receipt_id": fields.get("receipt_id"), "issued_at": fields["issued_at"]}
            unsettled += query.matches(receipt)
    bundle = bundles.bundle(
        batches, items, query.describe(), int(time.time()), keys.current, anchor_contract
    )
    return Export(bundle, unsettled, expired)


async def _batch_items(
    ledger: Ledger,
    keys: KeySet,
    assets: Mapping[str, Asset],
    payer: str,
    manifest: Mapping[str, Any],
    query: Query,
) -> list[dict[str, Any]]:
    entries: list[tuple[str, dict[str, str]]] = await ledger.call(
        ledger._redis.xrange(keyspace.receipts(payer), min=manifest["first"], max=manifest["last"])
    )
    receipts = [signed_receipt(payer, fields, assets, keys).to_wire() for _i, fields in entries]
    if not any(query.matches(r) for r in receipts):
        return []
    tree = merkle.MerkleTree([leaf(r) for r in receipts])
    if tree.root.hex() != manifest["merkle_root"] or tree.size != manifest["count"]:
        # The ledger's receipts no longer rebuild the anchored root: say so, export nothing.
        raise X402Error(
            f"batch {manifest['batch_id']}: the ledger's receipts do not rebuild its "
            "Merkle root (receipts trimmed or altered, or a signing key missing from the set)"
        )
    return bundles.entries(str(manifest["batch_id"]), receipts, tree, query.matches)
