"""Redis read raw in the tests: the ledger's clients, and streams (the receipts, the
credits) typed: redis-py's asyncio stubs leave XRANGE's reply a union with None."""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sidecar.ledger.accounts import Ledger
from sidecar.ledger.cluster import ClusterPipe
from sidecar.ledger.pipe import RedisPipe

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


def raw(ledger: Ledger) -> Redis | RedisCluster:
    """The ledger's own redis-py client, for tests that set up or inspect keys directly
    (the sidecar's code goes through the ledger's methods; Redis stays in sidecar/ledger)."""
    return ledger._redis


def raw_pipe(ledger: Ledger) -> RedisPipe | ClusterPipe:
    """The ledger's pipelined client (the hot path's), for tests of the connection itself."""
    return ledger._pipe
