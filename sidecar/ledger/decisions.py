"""Recent decisions for the operator's dashboard: a capped Redis stream of decision lines.

Workers hand over the lines their decision log writes, a batch at a time (at most every
`DecisionLog.FLUSH_SECONDS`), off the hot path: one script call per batch through the
ledger's pipelined connection (a redis-py pipeline of one XADD per line cost a paid check
~30 µs of CPU; see bench/feed.py), each XADD capped with `MAXLEN ~` so the stream stays a
bounded window of the newest lines.
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
FIELD = "line"


async def append(ledger: Ledger, lines: Sequence[str], keep: int = DEFAULT_KEEP) -> None:
    """Append decision lines (JSON) to the stream, oldest first; one round trip."""
    if not lines:
        return
    try:
        await ledger.pipe.evalsha(scripts.DECISIONS, (keyspace.DECISIONS,), (keep, *lines))
    except RedisPipeError as exc:
        raise unavailable(exc) from exc


async def recent(ledger: Ledger, count: int) -> list[dict[str, Any]]:
    """The newest `count` decisions, newest first; malformed entries are skipped."""
    entries = cast(
        list[tuple[str, dict[str, str]]],
        await ledger.call(ledger.redis.xrevrange(keyspace.DECISIONS, count=count)),
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
