"""Settlement in the tests: run the real `x402 settle` (or a pass that crashes on purpose)
and check that every receipt is in exactly one batch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, cast

from sidecar.core import batches, merkle
from sidecar.core.identity import Identity, KeySet
from sidecar.core.money import Asset
from sidecar.ledger import keyspace, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.cli import Run, python_module, x402
from tests.support.streams import raw, xrange


async def settle(stack: Stack, *args: str) -> Run:
    return await x402("settle", "--config", str(stack.config_path), "--flush", *args)


async def settle_crash(stack: Stack, step: str, *args: str) -> Run:
    """A settle pass like `settle`'s that kills its process at `step` (settle_crash.py)."""
    config = str(stack.config_path)
    return await python_module("tests.support.settle_crash", step, "--config", config, *args)


async def assert_exactly_once(ledger: Ledger, public_key: str) -> dict[str, int]:
    """Every receipt in Redis is in exactly one committed batch, batches chain per payer,
    and each manifest's signature and Merkle root hold. Returns receipts per payer."""
    redis = raw(ledger)
    per_payer = {}
    async for payer in redis.sscan_iter(keyspace.PAYERS):
        entries = await xrange(redis, keyspace.receipts(payer))
        stream_ids = [stream_id for stream_id, _fields in entries]
        fields_of = dict(entries)
        state = cast(dict[str, str], await redis.hgetall(keyspace.settlement(payer)))
        assert "claim_first" not in state, f"{payer}: a claim was left behind"
        placed: Counter[str] = Counter()
        previous = "0-0"
        for seq, manifest in enumerate(await settlement.payer_batches(ledger, payer), start=1):
            assert batches.verify_manifest(manifest, public_key)
            assert (manifest["payer"], manifest["seq"], manifest["previous"]) == (
                payer,
                seq,
                previous,
            )
            members = await xrange(
                redis, keyspace.receipts(payer), manifest["first"], manifest["last"]
            )
            assert len(members) == manifest["count"]
            placed.update(stream_id for stream_id, _f in members)
            previous = manifest["last"]
            # The anchored root is the root of exactly these receipts.
            leaves = [_leaf(payer, fields_of[stream_id], public_key) for stream_id, _f in members]
            assert manifest["merkle_root"] == leaves_root(leaves)
        assert all(n == 1 for n in placed.values()), f"{payer}: a receipt in two batches"
        assert sorted(placed) == sorted(stream_ids), f"{payer}: a receipt in no batch"
        assert state.get("settled", "0-0") == previous
        per_payer[payer] = len(stream_ids)
    return per_payer


_gateways: dict[str, Identity] = {}


def remember_gateway(stack: Stack) -> None:
    """assert_exactly_once re-derives receipts: it needs the gateway's signing key."""
    _gateways[stack.gateway_identity.public_key] = stack.gateway_identity


def _leaf(payer: str, fields: dict[str, str], public_key: str) -> bytes:
    gateway = _gateways[public_key]
    receipt = batches.signed_receipt(payer, fields, {"USDF": Asset("USDF", 6)}, KeySet(gateway))
    return batches.leaf(receipt.to_wire())


def leaves_root(leaves: list[bytes]) -> str:
    return merkle.MerkleTree(leaves).root.hex()


def jsonl_manifests(path: Path) -> list[dict[str, Any]]:
    return settlement.JsonlSink(path).manifests()
