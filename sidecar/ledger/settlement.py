"""Settlement batches: receipts → Merkle root → signed manifest → anchor sinks → commit.

Per payer, the ledger keeps a settled cursor (the last receipt-stream id in a committed
batch) under the payer's hash tag. One pass, for each payer:

1. claim (one Lua script): the receipts after the cursor, at most `batch_size`, once there
   are `batch_size` of them or the oldest is `max_age` old. The claimed range is stored.
   The same script first trims settled receipts older than `retention` (never one past
   the cursor): the ledger keeps receipts until settled, then for the retention period.
2. build (`sidecar/core/batches.py`, pure): re-derive every signed receipt with the key
   that signed it (signatures are deterministic; a claim holds one payee's receipts, so
   one key's), compute the Merkle root and sign the manifest with that key. Nothing in it depends on
   the clock or the worker, so a batch built again from the same claim is the same bytes
   and has the same id.
3. anchor: write the manifest to every sink; each is idempotent on the batch id.
4. commit (one Lua script): if the claim is still this range, move the cursor past it.

A crash anywhere leaves either no claim (nothing happened) or a claim whose batch a rerun
builds again identically, anchors again (a no-op where it got before) and commits once.
Several workers may run: a live claim belongs to one worker until its lease runs out, and
a worker that lost its claim finds the commit refused. So every receipt ends up in exactly
one batch; none is skipped, because only a commit moves the cursor, and only past a claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from redis.asyncio.cluster import RedisCluster

from sidecar.core.batches import build_batch
from sidecar.core.errors import SettlementError, X402Error
from sidecar.core.identity import KeySet
from sidecar.core.money import Asset
from sidecar.core.protocol import canonical_json
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import Ledger, translated
from sidecar.ledger.channels import Channels

# A fault hook is called with each step's name as the worker passes it: the crash tests
# pass one that kills the process at a chosen step, to prove a crash there is harmless.
Fault = Callable[[str], None]
FAULT_STEPS = ("after_claim", "mid_jsonl", "after_jsonl", "after_anchor", "after_commit")

log = structlog.get_logger("sidecar.settlement")


def _no_fault(step: str) -> None:
    pass


# -- anchor sinks -----------------------------------------------------------------------


class AnchorSink(Protocol):
    """Where signed manifests go. `anchor` must be idempotent on the batch id: after a
    crash the same manifest is anchored again. An on-chain anchor implements this too
    (e.g. write the Merkle root in a transaction, skip if the batch id is on chain)."""

    name: str

    async def anchor(self, manifest: Mapping[str, Any]) -> bool:
        """Record the manifest; False if this batch id was recorded already."""
        ...

    async def close(self) -> None:
        """Let go of connections (the chain's); the settle worker calls it when it stops."""
        ...


class RedisSink:
    """`x402:batch:<id>` holds the manifest, `x402:batches` indexes ids by closed_at.

    Each write is one key (cluster-safe) and idempotent (SET NX, ZADD of the same score).
    """

    name = "redis"

    def __init__(self, ledger: Ledger) -> None:
        self._redis = ledger._redis

    async def anchor(self, manifest: Mapping[str, Any]) -> bool:
        text = canonical_json(manifest).decode()
        with translated():
            created = await self._redis.set(keyspace.batch(manifest["batch_id"]), text, nx=True)
            await self._redis.zadd(keyspace.BATCHES, {manifest["batch_id"]: manifest["closed_at"]})
        return bool(created)

    async def close(self) -> None:
        pass  # the ledger's connection is the ledger's to close


class JsonlSink:
    """An append-only file, one manifest per line, each line fsynced before the commit.

    Idempotent on the batch id, across processes: the file is locked (flock) while the
    worker reads what it has not seen yet and appends. A line torn by a crash mid-write
    (no final newline) was never committed, so it is cut off before the next append.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], fault: Fault | None = None) -> None:
        self.path = Path(path)
        self.fault = fault
        self._seen: set[str] = set()
        self._offset = 0  # bytes of the file already indexed in _seen
        self._inode = -1

    async def anchor(self, manifest: Mapping[str, Any]) -> bool:
        line = canonical_json(manifest) + b"\n"
        return await asyncio.to_thread(self._append, str(manifest["batch_id"]), line)

    def _append(self, batch: str, line: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            stat = os.fstat(f.fileno())
            if stat.st_ino != self._inode or stat.st_size < self._offset:
                self._seen, self._offset, self._inode = set(), 0, stat.st_ino
            f.seek(self._offset)
            tail = f.read()
            complete = tail[: tail.rfind(b"\n") + 1]
            for text in complete.splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    self._seen.add(json.loads(text)["batch_id"])
            self._offset += len(complete)
            if len(complete) < len(tail):  # a torn last line: never anchored, drop it
                f.truncate(self._offset)
            if batch in self._seen:
                return False
            if self.fault is None:
                f.write(line)
            else:  # in two halves, so that a crash at "mid_jsonl" leaves a torn line
                half = len(line) // 2
                f.write(line[:half])
                f.flush()
                self.fault("mid_jsonl")
                f.write(line[half:])
            f.flush()
            os.fsync(f.fileno())
            self._offset += len(line)
            self._seen.add(batch)
            return True

    async def close(self) -> None:
        pass  # every append opens and closes the file

    def manifests(self) -> list[dict[str, Any]]:
        """Every complete line (for audits and tests)."""
        if not self.path.exists():
            return []
        found = []
        for text in self.path.read_bytes().splitlines(keepends=True):
            if text.endswith(b"\n"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(text))
        return found


# -- the worker -------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    batch_size: int = 1000  # receipts per batch at most; a full batch is settled at once
    max_age: float = 60.0  # seconds a partial batch may wait for more receipts
    lease: float = 30.0  # seconds a claim belongs to its worker before others take over
    flush: bool = False  # settle every pending receipt now, whatever its age
    retention: float = 0.0  # seconds a settled receipt stays in the ledger; 0: for ever
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass
class Report:
    batches: list[dict[str, Any]] = field(default_factory=list)  # committed manifests
    payers: int = 0
    waiting: int = 0  # payers whose partial batch is not old enough yet
    busy: int = 0  # payers whose claim another live worker holds
    stale: int = 0  # batches another worker committed first
    failed: int = 0  # payers whose batch could not be built or anchored (retried later)
    oldest_unsettled_ms: int | None = None

    @property
    def receipts(self) -> int:
        return sum(int(m["count"]) for m in self.batches)


class Settler:
    def __init__(
        self,
        ledger: Ledger,
        keys: KeySet,
        assets: Mapping[str, Asset],
        sinks: Sequence[AnchorSink],
        options: Options | None = None,
        fault: Fault | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.clock = clock  # unix seconds: the claims' "now" (receipts' age, retention)
        self._redis = ledger._redis
        self.keys = keys  # each batch is signed by the key that signed its receipts
        self.assets = dict(assets)
        self.sinks = list(sinks)
        self.options = options or Options()
        self._fault = fault or _no_fault
        self._claim = self._redis.register_script(scripts.source("settle_claim"))
        self._commit = self._redis.register_script(scripts.source("settle_commit"))
        self.channels = Channels(ledger)

    async def run_once(self) -> Report:
        """One pass over every registered payer."""
        report = Report()
        with translated():
            async for payer in self.ledger.scan_payers():
                report.payers += 1
                await self._close_expired_channels(payer)
                await self.settle_payer(payer, report)
            await self._record_pass(report)
        return report

    async def run_forever(self, interval: float, stop: asyncio.Event) -> None:
        """The in-sidecar worker: a pass every `interval` seconds until `stop` is set."""
        try:
            while not stop.is_set():
                try:
                    report = await self.run_once()
                    if report.batches:
                        log.info(
                            "settle.pass", batches=len(report.batches), receipts=report.receipts
                        )
                except X402Error as exc:
                    log.warning("settle.failed", error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close every sink (the chain sink's connections)."""
        for sink in self.sinks:
            await sink.close()

    async def settle_payer(self, payer: str, report: Report) -> None:
        """Claim, build, anchor, commit, until this payer has nothing ready."""
        options = self.options
        keys = (keyspace.settlement(payer), keyspace.receipts(payer))
        while True:
            now_ms = int(self.clock() * 1000)
            args = (
                options.worker_id,
                now_ms,
                int(options.lease * 1000),
                options.batch_size,
                0 if options.flush else int(options.max_age * 1000),
                int(options.retention * 1000),
            )
            result: list[Any] = await self.ledger.call(self._claim(keys=keys, args=args))
            status = result[0]
            if status == "empty":
                return
            if status == "wait":
                report.waiting += 1
                self._oldest(report, int(result[1]))
                return
            if status == "busy":
                report.busy += 1
                return
            _status, previous, first, last, seq, raw = result
            entries = [(stream_id, _pairs(values)) for stream_id, values in raw]
            self._fault("after_claim")
            try:
                batch = build_batch(payer, previous, int(seq), entries, self.assets, self.keys)
                for sink in self.sinks:
                    await sink.anchor(batch.manifest)
                    self._fault(f"after_{sink.name}")
            except (SettlementError, OSError) as exc:
                # The claim stays; after its lease any worker retries this same batch.
                log.error("settle.batch_failed", payer=payer, first=first, error=str(exc))
                report.failed += 1
                self._oldest(report, _ms(first))
                return
            self._fault("after_anchor")
            committed: list[Any] = await self.ledger.call(
                self._commit(
                    keys=(keyspace.settlement(payer), keyspace.payer_batches(payer)),
                    args=(first, last, batch.id),
                )
            )
            if committed[0] != "ok":
                report.stale += 1
                continue
            self._fault("after_commit")
            report.batches.append(batch.manifest)
            log.info(
                "settle.batch",
                batch_id=batch.id,
                payer=payer,
                seq=int(seq),
                count=len(entries),
                merkle_root=batch.manifest["merkle_root"],
            )

    async def _close_expired_channels(self, payer: str) -> None:
        """An expired channel's deposit goes back and its final voucher gets settled."""
        await self.channels.close_expired(payer)

    @staticmethod
    def _oldest(report: Report, ms: int) -> None:
        if report.oldest_unsettled_ms is None or ms < report.oldest_unsettled_ms:
            report.oldest_unsettled_ms = ms

    async def _record_pass(self, report: Report) -> None:
        """What the sidecar's /metrics reports as settlement lag."""
        await self.ledger.call(
            self._redis.hset(
                keyspace.SETTLEMENT,
                mapping={
                    "pass_at_ms": int(time.time() * 1000),
                    "oldest_unsettled_ms": report.oldest_unsettled_ms or 0,
                    "batches": len(report.batches),
                },
            )
        )


def _pairs(values: Sequence[str]) -> dict[str, str]:
    return dict(zip(values[::2], values[1::2], strict=True))


def _ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


async def settlement_lag(ledger: Ledger) -> float | None:
    """Seconds since the oldest receipt that was unsettled at the last pass (0: none was);
    None before any pass."""
    state = cast(dict[str, str], await ledger.call(ledger._redis.hgetall(keyspace.SETTLEMENT)))
    if not state:
        return None
    oldest = int(state.get("oldest_unsettled_ms", "0"))
    return max(time.time() - oldest / 1000, 0.0) if oldest else 0.0


# -- reading batches back (evidence, admin API) -----------------------------------------


async def payer_batches(ledger: Ledger, payer: str) -> list[dict[str, Any]]:
    """The payer's committed batches, in order."""
    ids = await ledger.call(ledger._redis.lrange(keyspace.payer_batches(payer), 0, -1))
    return await manifests(ledger, ids)


async def manifests(ledger: Ledger, ids: Sequence[str]) -> list[dict[str, Any]]:
    if not ids:
        return []
    keys = [keyspace.batch(i) for i in ids]
    if isinstance(ledger._redis, RedisCluster):
        # Manifests are keyed by batch id, so they spread over slots: one MGET per slot.
        texts = await ledger.call(ledger._redis.mget_nonatomic(keys))
    else:
        texts = await ledger.call(ledger._redis.mget(keys))
    found = []
    for batch, text in zip(ids, texts, strict=True):
        if text is None:
            raise SettlementError(f"batch {batch}: manifest missing from Redis")
        found.append(json.loads(text))
    return found


async def recent_batches(
    ledger: Ledger, limit: int = 100, payer: str | None = None
) -> list[dict[str, Any]]:
    """Newest first, from the anchor index (or one payer's committed list)."""
    if payer is not None:
        return list(reversed(await payer_batches(ledger, payer)))[:limit]
    ids = await ledger.call(ledger._redis.zrevrange(keyspace.BATCHES, 0, max(limit - 1, 0)))
    return await manifests(ledger, ids)


async def committed_seq(ledger: Ledger, payer: str) -> int:
    """The sequence number of the payer's last committed batch (0: none yet)."""
    seq = await ledger.call(ledger._redis.hget(keyspace.settlement(payer), "seq"))
    return int(seq or 0)
