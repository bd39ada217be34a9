"""Redis streams read raw in the tests (the receipts, the credits), typed: redis-py's
asyncio stubs leave XRANGE's reply a union with None."""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

Entries = list[tuple[str, dict[str, str]]]


async def xrange(
    redis: Redis | RedisCluster,
    key: str,
    first: str = "-",
    last: str = "+",
    count: int | None = None,
) -> Entries:
    """A stream's entries from `first` to `last` (inclusive), as (id, fields) pairs."""
    return cast(Entries, await redis.xrange(key, first, last, count))
