"""Durable money-in: a top-up's credit (and the record of an `exact` settlement) is
acknowledged only once the ledger's Redis has it on disk (docs/redis.md, "Durability").

On a server with `WAITAOF` (Redis >= 7.2, Valkey 8) the write is followed, on the same
connection, by `WAITAOF 1 <replicas> <timeout>`: the local AOF fsynced, and as many
replicas as the operator asks for. A server without it is durable only with
`appendfsync always` (fsynced before every reply); anything else refuses top-ups.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.core.errors import LedgerUnavailable
from sidecar.ledger.accounts import REDIS_ERRORS, Ledger, unavailable

T = TypeVar("T")

WAITAOF, FSYNC_ALWAYS, OFF, REFUSED = "waitaof", "fsync_always", "off", "refused"


@dataclass(frozen=True, slots=True)
class Mode:
    """How money-in is made durable on this ledger: `waitaof`, `fsync_always`, `off`
    (the operator switched it off) or `refused` (top-ups refused; `detail` says why)."""

    kind: str
    detail: str = ""

    @property
    def takes_money(self) -> bool:
        return self.kind != REFUSED


async def probe(ledger: Ledger, enabled: bool) -> Mode:
    """What the ledger's server offers. `enabled` False: durability switched off."""
    if not enabled:
        return Mode(OFF, "durability off (config durability.money_in: off)")
    if ledger.cluster:
        return Mode(REFUSED, "durable money-in is not supported on Redis Cluster yet")
    redis = ledger._redis
    assert isinstance(redis, Redis)
    try:
        info: dict[str, Any] = await ledger.call(redis.info("persistence"))
        waitaof = await _has_waitaof(redis)
    except LedgerUnavailable as exc:  # unreachable now: refused, probed again later
        return Mode(REFUSED, f"the ledger's Redis could not be asked ({exc})")
    aof = int(info.get("aof_enabled", 0)) == 1
    if waitaof:
        if not aof:
            return Mode(REFUSED, "the ledger's Redis has appendonly no: WAITAOF cannot fsync")
        return Mode(WAITAOF, "WAITAOF after every credit")
    try:
        fsync: dict[str, str] = await ledger.call(redis.config_get("appendfsync"))
    except LedgerUnavailable:  # CONFIG disabled (a managed Redis): cannot tell
        fsync = {}
    if aof and fsync.get("appendfsync") == "always":
        return Mode(FSYNC_ALWAYS, "no WAITAOF; appendfsync always fsyncs every write")
    return Mode(
        REFUSED,
        "the ledger's Redis has no WAITAOF (Redis < 7.2) and does not report appendonly yes "
        f"with appendfsync always (appendfsync: {fsync.get('appendfsync', 'unknown')})",
    )


async def _has_waitaof(redis: Redis) -> bool:
    """WAITAOF 0 0 0 answers at once where the command exists (any AOF setting)."""
    try:
        await redis.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return False
        raise unavailable(exc) from exc
    except REDIS_ERRORS as exc:
        raise unavailable(exc) from exc
    return True


class DurableWrites:
    """Runs a money-in write and, on a WAITAOF server, waits for it on the same connection."""

    def __init__(
        self, ledger: Ledger, enabled: bool = True, replicas: int = 0, timeout_ms: int = 1000
    ) -> None:
        self.ledger, self.enabled = ledger, enabled
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.mode = Mode(REFUSED, "not probed yet")

    async def refresh(self) -> Mode:
        """Ask the server again (at start, and while money-in is refused)."""
        self.mode = await probe(self.ledger, self.enabled)
        return self.mode

    async def takes_money(self) -> Mode:
        """The mode, probed again if it refuses (the operator may have fixed the server)."""
        return self.mode if self.mode.takes_money else await self.refresh()

    async def run(self, write: Callable[[Any], Awaitable[T]]) -> tuple[T, bool]:
        """`write(client)` (redis-py calls on `client`), then the wait: its result and
        whether the write is known durable (always True unless mode is `waitaof`)."""
        redis = self.ledger._redis
        if self.mode.kind != WAITAOF or not isinstance(redis, Redis):
            return await self.ledger.call(write(redis)), True
        waiting = self.ledger.waiting_client(self.timeout_ms / 1000)
        async with waiting.client() as connection:  # one connection: WAITAOF waits for its writes
            result = await self.ledger.call(write(connection))
            return result, await self._wait(connection)

    async def _wait(self, connection: Redis) -> bool:
        try:
            counts: list[int] = await self.ledger.call(
                connection.execute_command(  # type: ignore[no-untyped-call]
                    "WAITAOF", 1, self.replicas, self.timeout_ms
                )
            )
        except LedgerUnavailable:  # appendonly turned off since the probe, the server died
            return False
        return int(counts[0]) >= 1 and int(counts[1]) >= self.replicas
