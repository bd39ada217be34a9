"""Lane 7: compliance — a day's receipts as evidence, verified offline, explained.

An agent makes its day of paid calls. Then the operator settles the receipts into batches
(Merkle root, manifest signed by the gateway key, appended to an anchor log), exports the
day's evidence bundle, and an auditor verifies it offline with nothing but the gateway's
public key. The control narrative says which receipt proves which charge and which batch
anchors it. Writes evidence-DATE.json and anchors.jsonl in the current directory.

    python examples/compliance_export.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import lanes

from sidecar.agent import X402Auth
from sidecar.core.money import to_atomic, to_decimal


def x402(*args: str) -> str:
    """Run an `x402` command as the operator would, show it and its answer."""
    print("$ x402 " + " ".join(args))
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(done.stdout.rstrip())
    return done.stdout


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    gateway = world.gateways["api"]
    calls = ["/api/v1/agent/pay-api/atlas"] + [f"/api/v1/trade/verify/T-{n}" for n in range(3)]
    with httpx.Client(auth=X402Auth(world.wallet(max_amount="1"), strict=True)) as http:
        for path in calls * (1 if short else 5):
            http.get(gateway.url + path).raise_for_status()

    day = datetime.now(UTC).strftime("%Y-%m-%d")
    bundle, anchors = Path(f"evidence-{day}.json"), Path("anchors.jsonl")
    config = ("--config", gateway.config)
    x402("settle", "--flush", "--anchor-file", str(anchors), *config)
    now = str(int(time.time()) + 1)
    x402("evidence", "export", "--since", day, "--until", now, "--out", str(bundle), *config)
    verdict = x402("evidence", "verify", str(bundle), "--key", gateway.key)  # offline

    document = json.loads(bundle.read_text())
    batches = {batch["batch_id"]: batch for batch in document["batches"]}
    anchored = [json.loads(line)["batch_id"] for line in anchors.read_text().splitlines()]
    total = 0
    print("\ncontrol narrative")
    for entry in document["receipts"]:
        receipt, batch = entry["receipt"], batches[entry["batch_id"]]
        total += to_atomic(receipt["amount"], 6)
        # A channel has one receipt, at its close, for all its vouchers.
        charge = receipt.get("resource") or f"channel {receipt['channel_id']}"
        print(
            f"- receipt {receipt['receipt_id']} (signed by {receipt['kid']}) proves that payer "
            f"{receipt['payer'][:12]}… paid {receipt['amount']} {receipt['asset']} for "
            f"{charge}; it is leaf {entry['proof']['index']} of "
            f"{batch['count']} in batch {batch['batch_id']}, Merkle root "
            f"{batch['merkle_root'][:16]}…, manifest signed by the gateway and line "
            f"{anchored.index(batch['batch_id']) + 1} of {anchors}"
        )
    return {
        "lane": "compliance",
        "payer": world.wallet().public_key,
        "receipts": [e["receipt"]["receipt_id"] for e in document["receipts"]],
        "batches": sorted(batches),
        "total": to_decimal(total, 6),
        "verified": verdict.startswith("OK"),
        "bundle": str(bundle.resolve()),
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["compliance"], lane)
