"""What the operator's dashboard reads from the ledger: revenue from the receipt streams,
top-ups from the credit streams, open holds, channels and the settled cursor.

Read-only, off the hot path. Amounts stay atomic integers here; the server shows them
as decimals of their asset. Each payer's keys are read per payer (one hash-tag slot), so
this runs unchanged on Redis Cluster.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio.cluster import RedisCluster

from sidecar.ledger import keyspace
from sidecar.ledger.accounts import Ledger

HOUR, DAY = 3600, 86400
CHANNEL_ROUTE = "(channel close)"  # a channel's revenue is one receipt at its close
MAX_PAYERS = 10_000  # a dashboard page reads at most this many payers


@dataclass(frozen=True, slots=True)
class ReceiptRecord:
    stream_id: str
    payer: str
    route: str
    asset: str
    amount: int  # atomic
    issued_at: int  # unix seconds
    fields: dict[str, str]


@dataclass
class Revenue:
    """Revenue per (route, asset): all time, the last hour and day, and per hour of the day."""

    now: int
    total: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    hour: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    day: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    count: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # asset → 24 hourly sums, oldest first (index 23: the hour up to now)
    hourly: dict[str, list[int]] = field(default_factory=dict)
    by_payer: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, receipt: ReceiptRecord) -> None:
        key = (receipt.route, receipt.asset)
        self.total[key] += receipt.amount
        self.count[key] += 1
        self.by_payer[(receipt.payer, receipt.asset)] += receipt.amount
        age = self.now - receipt.issued_at
        if age < HOUR:
            self.hour[key] += receipt.amount
        if age < DAY:
            self.day[key] += receipt.amount
            slot = 23 - max(age, 0) // HOUR
            self.hourly.setdefault(receipt.asset, [0] * 24)[slot] += receipt.amount

    def top_payers(self, limit: int = 10) -> list[tuple[str, str, int]]:
        ranked = sorted(self.by_payer.items(), key=lambda item: (-item[1], item[0]))
        return [(payer, asset, amount) for (payer, asset), amount in ranked[:limit]]


def receipt_of(payer: str, stream_id: str, fields: dict[str, str]) -> ReceiptRecord:
    route = fields.get("route") or (CHANNEL_ROUTE if fields.get("kind") == "channel" else "")
    try:
        amount, issued = int(fields.get("amount", "0")), int(fields.get("issued_at", "0"))
    except ValueError:
        amount, issued = 0, 0
    return ReceiptRecord(stream_id, payer, route, fields.get("asset", ""), amount, issued, fields)


async def payers(ledger: Ledger, limit: int = MAX_PAYERS) -> list[str]:
    """Registered payers, sorted; at most `limit`."""
    found: list[str] = []
    async for payer in ledger.scan_payers():
        found.append(payer)
        if len(found) >= limit:
            break
    return sorted(found)


async def receipts(ledger: Ledger, payer: str) -> list[ReceiptRecord]:
    """Every receipt of the payer still in its stream, oldest first."""
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await ledger.call(ledger._redis.xrange(keyspace.receipts(payer))),
    )
    return [receipt_of(payer, stream_id, fields) for stream_id, fields in entries]


async def recent_receipts(ledger: Ledger, payer: str, count: int) -> list[ReceiptRecord]:
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await ledger.call(ledger._redis.xrevrange(keyspace.receipts(payer), count=count)),
    )
    return [receipt_of(payer, stream_id, fields) for stream_id, fields in entries]


async def revenue(ledger: Ledger, among: Iterable[str], now: int | None = None) -> Revenue:
    """Revenue summed over the payers' receipt streams (the ledger's own record)."""
    report = Revenue(int(time.time()) if now is None else now)
    for payer in among:
        for receipt in await receipts(ledger, payer):
            report.add(receipt)
    return report


@dataclass(frozen=True, slots=True)
class CreditRecord:
    payer: str
    asset: str
    amount: int
    at: int
    source: str  # "topup" for self-serve (exact), "" for an operator's credit
    transaction: str


async def credits(ledger: Ledger, among: Iterable[str], per_payer: int = 20) -> list[CreditRecord]:
    """The newest credits of each payer (operator credits and self-serve top-ups), newest
    first."""
    found = []
    for payer in among:
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await ledger.call(ledger._redis.xrevrange(keyspace.credits(payer), count=per_payer)),
        )
        for _id, f in entries:
            try:
                amount, at = int(f.get("amount", "0")), int(f.get("at", "0"))
            except ValueError:
                continue
            found.append(
                CreditRecord(
                    payer,
                    f.get("asset", ""),
                    amount,
                    at,
                    f.get("source", ""),
                    f.get("transaction", ""),
                )
            )
    found.sort(key=lambda t: -t.at)
    return found


async def open_holds(ledger: Ledger, among: Iterable[str]) -> int:
    total = 0
    for payer in among:
        total += int(await ledger.call(ledger._redis.hlen(keyspace.holds(payer))))
    return total


async def channel_ids(ledger: Ledger, payer: str) -> list[str]:
    """The payer's open channels."""
    ids = await ledger.call(ledger._redis.smembers(keyspace.channels(payer)))
    return sorted(cast(set[str], ids))


async def settled_cursor(ledger: Ledger, payer: str) -> str:
    """The last receipt-stream id in a committed batch ("0-0": none)."""
    value = await ledger.call(ledger._redis.hget(keyspace.settlement(payer), "settled"))
    return str(value or "0-0")


def stream_after(stream_id: str, cursor: str) -> bool:
    """Whether a stream id comes after the cursor (ids are <ms>-<seq>)."""

    def key(value: str) -> tuple[int, int]:
        ms, _, seq = value.partition("-")
        return int(ms or 0), int(seq or 0)

    return key(stream_id) > key(cursor)


@dataclass(frozen=True, slots=True)
class Memory:
    """The ledger's Redis memory (INFO memory): what it uses and its `maxmemory` (0: none
    set). On Redis Cluster, the primary nearest its limit (or the largest, with none)."""

    used: int
    maximum: int

    def fill(self) -> float:
        return self.used / self.maximum if self.maximum else 0.0


async def memory(ledger: Ledger) -> Memory:
    """INFO memory of the ledger's Redis (of every primary, on a cluster)."""
    if isinstance(ledger._redis, RedisCluster):
        reply = await ledger.call(ledger._redis.info("memory", target_nodes=RedisCluster.PRIMARIES))
    else:
        reply = await ledger.call(ledger._redis.info("memory"))
    infos = [reply] if "used_memory" in reply else list(reply.values())
    nodes = [Memory(int(i["used_memory"]), int(i.get("maxmemory", 0))) for i in infos]
    return max(nodes, key=lambda m: (m.fill(), m.used))
