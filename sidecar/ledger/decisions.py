"""Recent decisions for the operator's dashboard: a capped Redis stream of decision lines.

Workers hand over the lines their decision log writes, a batch at a time (at most every
`DecisionLog.FLUSH_SECONDS`), off the hot path: one script call per batch through the
ledger's pipelined connection (a redis-py pipeline of one XADD per line costs a paid check
measurably more: bench/feed.py, docs/performance.md), each XADD capped with `MAXLEN ~` so
the stream stays a bounded window of the newest lines, and the batch trimmed further when
the stream's memory passes its byte cap (lines are bounded too: core/decision.FIELD_BYTES
per field).
Losing a batch (Redis down) loses dashboard rows, never money: the stream is a view.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import Ledger, unavailable
from sidecar.ledger.pipe import RedisPipeError

DEFAULT_KEEP = 10_000  # lines kept, about (MAXLEN ~ trims whole nodes)
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # the stream's memory (MEMORY USAGE), at most about
FIELD = "line"


async def append(
    ledger: Ledger,
    lines: Sequence[str],
    keep: int = DEFAULT_KEEP,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """Append decision lines (JSON) to the stream, oldest first; one round trip. The stream
    keeps about `keep` lines and at most about `max_bytes` of Redis memory."""
    if not lines:
        return
    try:
        await ledger._pipe.evalsha(
            scripts.DECISIONS, (keyspace.DECISIONS,), (keep, max_bytes, *lines)
        )
    except RedisPipeError as exc:
        raise unavailable(exc) from exc


async def kept(ledger: Ledger) -> int:
    """How many lines the stream holds now."""
    return int(await ledger.call(ledger._redis.xlen(keyspace.DECISIONS)))


async def recent(ledger: Ledger, count: int) -> list[dict[str, Any]]:
    """The newest `count` decisions, newest first; malformed entries are skipped."""
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await ledger.call(ledger._redis.xrevrange(keyspace.DECISIONS, count=count)),
    )
    found = []
    for _id, fields in entries:
        try:
            line = json.loads(fields.get(FIELD, ""))
        except ValueError:
            continue
        if isinstance(line, dict):
            found.append(line)
    return found
