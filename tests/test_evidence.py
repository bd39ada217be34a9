"""Evidence bundles: export (by payer, receipt, time range) after real paid requests and a
real `x402 settle`; offline verification, and every tampering named for what it is."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.core import batches, bundles, merkle
from sidecar.core.identity import Identity
from sidecar.core.protocol import canonical_json
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.cli import x402
from tests.support.payers import payers_with_receipts
from tests.support.settlement import settle


@dataclass
class Settled:
    payer: str
    receipts: list[dict[str, Any]]
    bundle: dict[str, Any]
    key: str


@pytest.fixture(scope="module")
async def settled(
    stack: Stack, ledger: Ledger, tmp_path_factory: pytest.TempPathFactory
) -> Settled:
    """12 paid requests, settled in batches of 5, exported by payer through the CLI."""
    work = tmp_path_factory.mktemp("evidence")
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        [(wallet, receipts)] = await payers_with_receipts(ledger, client, stack, [12])
    run = await settle(stack, "--batch-size", "5", "--anchor-file", str(work / "anchors.jsonl"))
    assert run.code == 0, run.err
    out = work / "bundle.json"
    run = await export(stack, out, "--payer", wallet.public_key)
    assert "wrote" in run.out and "12 receipts in 3 batches" in run.out
    return Settled(
        wallet.public_key, receipts, json.loads(out.read_text()), stack.gateway_identity.public_key
    )


async def export(stack: Stack, out: Path, *query: str) -> Any:
    run = await x402(
        "evidence", "export", *query, "--out", str(out), "--config", str(stack.config_path)
    )
    assert run.code == 0, run.err
    return run


def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document))


async def verify(bundle: dict[str, Any], path: Path, key: str) -> Any:
    write_json(path, bundle)
    return await x402("evidence", "verify", str(path), "--key", key)


async def test_an_exported_bundle_verifies_offline(settled: Settled, tmp_path: Path) -> None:
    bundle = settled.bundle
    # The bundle holds exactly the receipts the agent got, and their batches.
    assert [i["receipt"] for i in bundle["receipts"]] == settled.receipts
    assert [m["count"] for m in bundle["batches"]] == [5, 5, 2]
    assert bundle["statement"]["receipts"] == [r["receipt_id"] for r in settled.receipts]

    run = await verify(bundle, tmp_path / "b.json", settled.key)

    assert run.code == 0, run.out
    assert run.out.strip() == "OK: 12 receipts in 3 batches verify"
    # The key may also come from a file.
    key_file = tmp_path / "gateway.pub"
    key_file.write_text(settled.key + "\n")
    assert (
        await x402("evidence", "verify", str(tmp_path / "b.json"), "--key", str(key_file))
    ).code == 0


async def test_export_by_receipt_and_by_time_range(
    stack: Stack, settled: Settled, tmp_path: Path
) -> None:
    target = settled.receipts[7]
    await export(stack, tmp_path / "one.json", "--receipt", target["receipt_id"])
    one = json.loads((tmp_path / "one.json").read_text())
    assert [i["receipt"] for i in one["receipts"]] == [target]
    assert [m["seq"] for m in one["batches"]] == [2]
    assert bundles.verify_bundle(one, settled.key).ok

    since = min(r["issued_at"] for r in settled.receipts)
    until = max(r["issued_at"] for r in settled.receipts) + 1
    await export(stack, tmp_path / "range.json", "--since", str(since), "--until", str(until))
    ranged = json.loads((tmp_path / "range.json").read_text())
    ids = {i["receipt"]["receipt_id"] for i in ranged["receipts"]}
    assert {r["receipt_id"] for r in settled.receipts} <= ids  # other tests' too, if settled
    assert bundles.verify_bundle(ranged, settled.key).ok


async def test_a_changed_amount_is_named(settled: Settled, tmp_path: Path) -> None:
    bundle = copy.deepcopy(settled.bundle)
    item = bundle["receipts"][3]
    item["receipt"]["amount"] = "0.001"

    run = await verify(bundle, tmp_path / "b.json", settled.key)

    rid = item["receipt"]["receipt_id"]
    assert run.code == 1
    assert f"FAIL: receipt {rid}: gateway signature does not verify (altered)" in run.out
    assert f"FAIL: receipt {rid}: Merkle proof does not lead to batch" in run.out
    assert run.out.count("FAIL") == 2  # nothing else is blamed


async def test_a_dropped_receipt_is_named(settled: Settled) -> None:
    bundle = copy.deepcopy(settled.bundle)
    dropped = bundle["receipts"].pop(6)["receipt"]["receipt_id"]

    verdict = bundles.verify_bundle(bundle, settled.key)

    assert verdict.problems == [
        f"receipt {dropped}: listed in the signed export statement but missing (dropped)"
    ]
    # Taking it off the statement too breaks the statement's signature.
    bundle["statement"]["receipts"].remove(dropped)
    assert (
        bundles.verify_bundle(bundle, settled.key)
        .problems[0]
        .startswith("export statement: signature does not verify")
    )


async def test_a_forged_manifest_is_named(settled: Settled, tmp_path: Path) -> None:
    bundle = copy.deepcopy(settled.bundle)
    manifest = bundle["batches"][0]
    # The forger rebuilds batch 1 without its first receipt and signs with its own key.
    forger = Identity.generate()
    leaves = [batches.leaf(i["receipt"]) for i in bundle["receipts"][1:5]]
    body = {k: v for k, v in manifest.items() if k != "signature"}
    body.update(merkle_root=merkle.MerkleTree(leaves).root.hex(), count=4)
    manifest.clear()
    manifest.update(body, signature=forger.sign(batches.BATCH_DOMAIN + canonical_json(body)))

    run = await verify(bundle, tmp_path / "b.json", settled.key)

    assert run.code == 1
    batch = manifest["batch_id"]
    assert f"FAIL: batch {batch}: manifest signature does not verify (forged or altered)" in run.out
    for item in bundle["receipts"][:5]:  # none of its receipts proves against the forgery
        rid = item["receipt"]["receipt_id"]
        assert f"FAIL: receipt {rid}: Merkle proof does not lead to batch {batch}'s root" in run.out


async def test_the_wrong_key_fails_everything(settled: Settled) -> None:
    other = Identity.generate()
    verdict = bundles.verify_bundle(settled.bundle, other.public_key)
    assert not verdict.ok
    assert len([p for p in verdict.problems if f"not a key of the set ({other.kid})" in p]) == 15


async def test_unsettled_receipts_are_not_exported(
    stack: Stack, ledger: Ledger, settled: Settled, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        [(wallet, [fresh])] = await payers_with_receipts(ledger, client, stack, [1])

    run = await x402(
        "evidence", "export", "--receipt", fresh["receipt_id"], "--out", str(tmp_path / "x.json"),
        "--config", str(stack.config_path),
    )  # fmt: skip
    assert run.code == 1
    assert f"receipt {fresh['receipt_id']} is in no settled batch (run x402 settle)" in run.err
    run = await export(stack, tmp_path / "p.json", "--payer", wallet.public_key)
    assert "1 matching receipts are not settled yet" in run.out
