"""`x402 settle`: one settle worker configured like the sidecar, run once or every few
seconds, and its report in lines."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.core.errors import X402Error
from sidecar.server import wiring

if TYPE_CHECKING:
    from sidecar.ledger.accounts import Ledger
    from sidecar.ledger.settlement import Report
    from sidecar.server.config import Settings


@dataclass(frozen=True)
class SettleRequest:
    """The command's overrides of the config's settle_* keys (None: the config's)."""

    flush: bool = False
    watch: float | None = None  # keep settling every so many seconds until interrupted
    batch_size: int | None = None
    max_age: float | None = None
    lease: float | None = None
    anchor_file: str | None = None
    worker_id: str | None = None


async def settle(ledger: Ledger, settings: Settings, request: SettleRequest) -> str:
    """Settle what is due; the batches made and a summary line. X402Error (with those lines)
    when a batch failed."""
    worker = wiring.settler(
        settings,
        ledger,
        settings.signing_keys(),
        anchor_file=request.anchor_file,
        batch_size=request.batch_size,
        max_age=request.max_age,
        lease=request.lease,
        flush=request.flush or None,
        worker_id=request.worker_id,
    )
    if request.watch is not None:
        await worker.run_forever(request.watch, asyncio.Event())
    try:
        report = await worker.run_once()
    finally:
        await worker.close()
    lines = report_lines(report)
    if report.failed:
        raise X402Error("\n".join([*lines, "some batches failed; see the log"]))
    return "\n".join(lines)


def report_lines(report: Report) -> list[str]:
    lines = [
        f"{m['batch_id']} payer {m['payer'][:12]}… seq {m['seq']}: {m['count']} receipts, "
        f"root {m['merkle_root'][:16]}…"
        for m in report.batches
    ]
    lines.append(
        f"settled {report.receipts} receipts in {len(report.batches)} batches "
        f"({report.payers} payers; {report.waiting} waiting, {report.busy} busy, "
        f"{report.failed} failed)"
    )
    return lines
