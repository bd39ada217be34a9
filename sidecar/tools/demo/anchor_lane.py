"""The demo's anchor lane: the operator deploys a BatchAnchor on anvil, settles the receipts
the story made (each batch's Merkle root published from the operator's key), exports one
receipt's evidence and proves it against the root on chain; a tampered copy fails."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, replace
from typing import Any

from structlog.testing import capture_logs

from sidecar.core import bundles
from sidecar.core.identity import write_secret
from sidecar.ledger import evidence
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.config import Settings
from sidecar.tools.anchoring import deploy, read_roots
from sidecar.tools.demo.narration import Narration
from sidecar.tools.demo.world import DemoChain, short
from sidecar.tools.onchain import operator
from sidecar.tools.settle import report_lines
from sidecar.tools.stack import Stack


@dataclass
class Proven:
    bundle: dict[str, Any]
    batches: int  # anchored by this settle pass
    report: list[str]  # what x402 settle prints


class AnchorLane:
    def __init__(self, story: Narration, stack: Stack) -> None:
        self.story, self.stack = story, stack

    def run(self, onchain: DemoChain) -> None:
        chain = onchain.chain
        self.story.step(
            "D. Every receipt provable against the chain",
            "The operator deploys a BatchAnchor (x402 anchor deploy) and settles: each batch's\n"
            "Merkle root goes on chain from the operator's key. x402 evidence verify --chain\n"
            "then proves a receipt against the root the contract holds, with no trust in the\n"
            "operator's files.",
        )
        key_file = self.stack.dir / "anchor-operator.key"
        if not key_file.exists():
            write_secret(key_file, operator(chain).key + "\n")
        deployed = deploy(chain.rpc_url, str(key_file))
        self.story.console.print(f"BatchAnchor  {deployed.address} (operator {deployed.operator})")
        anchor_chain = {
            "rpc_url": chain.rpc_url,
            "contract": deployed.address,
            "key_file": str(key_file),
        }
        settings = replace(Settings.load(self.stack.config_path), anchor_chain=anchor_chain)
        with capture_logs():  # the settle worker's log lines: the report says it all
            proven = asyncio.run(self.settle_and_export(settings, deployed.address))
        self.story.console.print("x402 settle --flush (anchor_chain configured):")
        for line in proven.report:
            self.story.console.print(f"  {line}", markup=False)
        [item, *_] = proven.bundle["receipts"]
        found = read_roots(chain.rpc_url, deployed.address, bundles.anchored_batches(proven.bundle))
        root = found.roots.get(item["batch_id"])
        self.story.console.print(
            f"receipt      {item['receipt']['receipt_id']}, leaf {item['proof']['index']} of "
            f"{item['proof']['size']} in {item['batch_id']}"
        )
        self.story.console.print(
            f"on chain     roots(sha256(batch id)) = {short(root.hex() if root else 'none', 24)}"
        )
        problems = bundles.check_anchors(proven.bundle, found.roots)
        self.story.check(
            "receipt proven on chain",
            proven.batches > 0 and root is not None and not problems,
            f"{len(proven.bundle['receipts'])} receipts, each proof leads to its batch's "
            f"root in the contract's storage (roots(batchKey)) on {found.network}",
        )
        tampered = copy.deepcopy(proven.bundle)
        tampered["receipts"][0]["receipt"]["amount"] = "0.000001"
        refused = bundles.check_anchors(tampered, found.roots)
        self.story.check(
            "tampered receipt refused",
            [p.reason for p in refused] == ["proof_mismatch"],
            refused[0].message if refused else "the altered receipt was not refused",
        )

    async def settle_and_export(self, settings: Settings, contract: str) -> Proven:
        """Settle everything pending (the chain sink configured), then export the first
        committed batch's payer."""
        ledger = Ledger.from_url(self.stack.redis_url)
        try:
            anchor_file = str(self.stack.dir / "anchors.jsonl")
            worker = wiring.settler(
                settings, ledger, settings.signing_keys(), anchor_file=anchor_file, flush=True
            )
            try:
                report = await worker.run_once()
            finally:
                await worker.close()
            payer = report.batches[0]["payer"] if report.batches else None
            query = evidence.Query(payer=payer)
            keys, assets = settings.signing_keys(), settings.asset_table()
            exported = await evidence.export(ledger, keys, assets, query, contract)
            return Proven(exported.bundle, len(report.batches), report_lines(report))
        finally:
            await ledger.close()
