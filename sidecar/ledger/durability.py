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
from redis.exceptions import MovedError, ResponseError

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
    """What the ledger's servers offer (on Redis Cluster, every master must offer it).
    `enabled` False: durability switched off."""
    if not enabled:
        return Mode(OFF, "durability off (config durability.money_in: off)")
    try:
        servers = [(name, await _facts(ledger, redis)) for name, redis in await ledger.servers()]
    except LedgerUnavailable as exc:  # unreachable now: refused, probed again later
        return Mode(REFUSED, f"the ledger's Redis could not be asked ({exc})")
    if not servers:  # a Cluster whose map names no master: nothing can be asked
        return Mode(REFUSED, "the ledger's Redis Cluster reports no master")
    modes = [(name, _mode(facts)) for name, facts in servers]
    cluster = ledger.cluster
    for name, mode in modes:
        if not mode.takes_money:
            return Mode(REFUSED, f"{name}: {mode.detail}" if cluster else mode.detail)
    kinds = {mode.kind for _, mode in modes}
    if kinds == {WAITAOF}:
        return Mode(WAITAOF, "WAITAOF after every credit" + (" (every master)" if cluster else ""))
    if all(facts.fsync_always for _, facts in servers):  # some without WAITAOF: all fsync
        return Mode(FSYNC_ALWAYS, "appendfsync always on every master fsyncs every write")
    return Mode(
        REFUSED,
        "the Cluster's masters differ: some have WAITAOF, others only appendfsync always; "
        "run every master with appendfsync always, or all on Redis >= 7.2 / Valkey 8",
    )


@dataclass(frozen=True, slots=True)
class _Facts:
    """What one server says of its persistence."""

    waitaof: bool
    aof: bool
    appendfsync: str  # "" where CONFIG is disabled (a managed Redis): cannot tell

    @property
    def fsync_always(self) -> bool:
        return self.aof and self.appendfsync == "always"


async def _facts(ledger: Ledger, redis: Redis) -> _Facts:
    info: dict[str, Any] = await ledger.call(redis.info("persistence"))
    waitaof = await _has_waitaof(redis)
    try:
        fsync: dict[str, str] = await ledger.call(redis.config_get("appendfsync"))
    except LedgerUnavailable:  # CONFIG disabled (a managed Redis): cannot tell
        fsync = {}
    return _Facts(waitaof, int(info.get("aof_enabled", 0)) == 1, fsync.get("appendfsync", ""))


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


def _mode(facts: _Facts) -> Mode:
    """One server's durability."""
    if facts.waitaof:
        if not facts.aof:
            return Mode(REFUSED, "the ledger's Redis has appendonly no: WAITAOF cannot fsync")
        return Mode(WAITAOF, "WAITAOF after every credit")
    if facts.fsync_always:
        return Mode(FSYNC_ALWAYS, "no WAITAOF; appendfsync always fsyncs every write")
    return Mode(
        REFUSED,
        "the ledger's Redis has no WAITAOF (Redis < 7.2) and does not report appendonly yes "
        f"with appendfsync always (appendfsync: {facts.appendfsync or 'unknown'})",
    )


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

    async def run(self, write: Callable[[Any], Awaitable[T]], key: str) -> tuple[T, bool]:
        """`write(client)` (redis-py calls on `client`, on keys in `key`'s slot), then the
        wait: its result and whether the write is known durable (always True unless mode
        is `waitaof`)."""
        if self.mode.kind != WAITAOF:
            return await self.ledger.call(write(self.ledger._redis)), True
        waiting = await self.ledger.waiting_client(self.timeout_ms / 1000, key)
        async with waiting.client() as connection:  # one connection: WAITAOF waits for its writes
            try:
                result = await self.ledger.call(write(connection))
            except LedgerUnavailable as exc:
                # The Cluster's slot moved since the map was read: Redis refused before the
                # script ran (nothing written), so this fails closed and the next call goes
                # to the new owner. (ASK, TRYAGAIN: mid-migration, fails closed until done.)
                moved = exc.__cause__
                if isinstance(moved, MovedError):
                    self.ledger.moved(key, moved.host, moved.port)
                raise
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
