"""The recent-decisions feed: each worker's decision lines, a batch per decision-log flush,
appended to the ledger's capped stream (ledger/decisions.py) for the dashboard.

Off the hot path: the decision log calls the feed once per flush (at most every 10 ms,
or every 256 lines), and the feed sends the batch in a background task. A slow or absent
Redis never slows a check: past `MAX_IN_FLIGHT` unfinished batches, a batch is dropped
(and counted), and a failed batch is dropped. The stream is a view; money is elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib

from sidecar.core.errors import LedgerUnavailable
from sidecar.ledger import decisions
from sidecar.ledger.accounts import Ledger

MAX_IN_FLIGHT = 4
SEND_TIMEOUT = 2.0


class DecisionFeed:
    def __init__(
        self,
        ledger: Ledger,
        keep: int = decisions.DEFAULT_KEEP,
        max_bytes: int = decisions.DEFAULT_MAX_BYTES,
    ) -> None:
        self.ledger, self.keep, self.max_bytes = ledger, keep, max_bytes
        self.in_flight: set[asyncio.Task[None]] = set()
        self.dropped = 0  # lines not appended (busy or failed)

    def __call__(self, lines: list[str]) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self.dropped += len(lines)
            return
        try:
            task = asyncio.get_running_loop().create_task(self._send(lines))
        except RuntimeError:  # no running loop (a worker's last flush): not sent
            self.dropped += len(lines)
            return
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _send(self, lines: list[str]) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await decisions.append(self.ledger, lines, self.keep, self.max_bytes)
        except (LedgerUnavailable, TimeoutError):
            self.dropped += len(lines)

    async def close(self) -> None:
        """Wait for the batches on their way (at most SEND_TIMEOUT)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.in_flight, return_exceptions=True)
