"""`python -m tests.support.settle_crash STEP --config FILE [--batch-size N] [--worker-id ID]
[--lease SECONDS]`

One `x402 settle --flush` pass, built as the CLI builds it, that SIGKILLs its own process
at STEP (one of settlement.FAULT_STEPS): the crash tests prove a crash there loses nothing
and charges nothing twice."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from sidecar.ledger import settlement
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.config import Settings


def kill_at(step: str) -> settlement.Fault:
    def fault(at: str) -> None:
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


async def settle_once(
    step: str, config: str, batch_size: int | None, worker_id: str | None, lease: float | None
) -> None:
    settings = Settings.load(config)
    ledger = Ledger.from_url(settings.redis_url)
    try:
        worker = wiring.settler(
            settings,
            ledger,
            settings.signing_keys(),
            fault=kill_at(step),
            batch_size=batch_size,
            worker_id=worker_id,
            lease=lease,
            flush=True,
        )
        await worker.run_once()
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.settle_crash")
    parser.add_argument("step", choices=settlement.FAULT_STEPS)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--lease", type=float, default=None)
    args = parser.parse_args()
    asyncio.run(settle_once(args.step, args.config, args.batch_size, args.worker_id, args.lease))


if __name__ == "__main__":
    main()
