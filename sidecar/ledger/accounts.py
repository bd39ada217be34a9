"""The Redis ledger: payers, balances, spent nonces and receipts. Money moves only in Lua."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from sidecar.core import retries
from sidecar.core.errors import (
    InsufficientFunds,
    LedgerUnavailable,
    NonceReused,
    PaymentConflict,
    PaymentInProgress,
    UnknownPayer,
    X402Error,
    refusal,
)
from sidecar.core.money import MAX_BALANCE
from sidecar.core.retries import Retry
from sidecar.ledger import cluster as redis_cluster
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.cluster import ClusterPipe
from sidecar.ledger.pipe import Address, RedisPipe, RedisPipeError, Script, redacted

IDEMPOTENCY_TTL = 30 * 24 * 3600  # a retried top-up is recognised for 30 days
NONCE_GRACE = 120  # seconds a spent nonce outlives its proof, for clock skew between replicas
ACTIVE, SUSPENDED = "active", "suspended"
# A hot-path script refuses to move money once half the time its caller can wait has passed
# (the Redis timeout, or less if Envoy gives up sooner), by Redis's clock: its reply could
# arrive after the caller answered 503, and a 503 never charges. The other half covers the
# reply's trip back and modest clock skew between hosts (docs/redis.md).
DEADLINE_SHARE = 0.5
DEADLINE_PASSED = "deadline_passed"

REDELIVERED = "redelivered"

T = TypeVar("T")
NO_RETRY = RedisRetry(NoBackoff(), 0)  # redis-py retries a timed-out command otherwise


@dataclass(frozen=True, slots=True)
class Redelivered:
    """A retry of a payment already charged: what its first charge recorded (the receipt
    id, the balance after it, and the scheme's own fields). Nothing was charged again."""

    outcome: dict[str, str]


def deadline_ms(timeout: float, within: float | None = None) -> int:
    """The unix time in ms after which a script sent now must refuse (see DEADLINE_SHARE):
    `timeout` is the client's Redis timeout, `within` how long the caller can still wait."""
    wait = timeout if within is None else min(timeout, within)
    return int((time.time() + wait * DEADLINE_SHARE) * 1000)


@dataclass(frozen=True, slots=True)
class Credit:
    balance: int
    applied: bool  # False when the idempotency key had been used already


@dataclass(frozen=True, slots=True)
class Account:
    payer: str
    status: str
    balances: dict[str, int]
    credited: dict[str, int]
    debited: dict[str, int]
    channeled: dict[str, int]  # locked in open channels, out of `balances`
    held: dict[str, int] = field(default_factory=dict)  # in open holds, out of `balances`


class Ledger:
    """Debits, the hot path, go through the pipelined client; the rest through redis-py.

    Redis stays inside the ledger package: its two clients (`_redis`, `_pipe`) are used by
    the ledger's own modules only; everything above calls the ledger's methods and sees a
    Redis failure as LedgerUnavailable, never as a Redis error (see `translated`)."""

    def __init__(
        self, client: aioredis.Redis | RedisCluster, pipe: RedisPipe | ClusterPipe
    ) -> None:
        self._redis = client
        self._pipe = pipe
        # waiting_client's and servers', by server and socket timeout
        self._waiting: dict[tuple[Address, float], aioredis.Redis] = {}
        self.url = ""  # redis_url without its password, for logs
        # register_script: EVALSHA, and a reload on NOSCRIPT after a Redis restart.
        self._credit = client.register_script(scripts.source("credit"))

    @property
    def cluster(self) -> bool:
        """On Redis Cluster (`redis+cluster://`): multi-key commands must stay in one slot."""
        return isinstance(self._redis, RedisCluster)

    @classmethod
    def from_url(cls, url: str, timeout: float = 1.0) -> Ledger:
        """The ledger at `url` (docs/redis.md: redis://, rediss://, unix://, and
        redis+cluster:// or rediss+cluster:// for Redis Cluster); connects lazily."""
        try:
            if redis_cluster.is_cluster_url(url):
                cluster_pipe = ClusterPipe(url, timeout=timeout, scripts=(scripts.DEBIT,))
                ledger = cls(redis_cluster.client(url, timeout), cluster_pipe)
            else:
                pipe = RedisPipe(url, timeout=timeout, scripts=(scripts.DEBIT,))
                ledger = cls(_client(pipe.address, timeout), pipe)
        except ValueError as exc:
            raise X402Error(f"redis_url {redacted(url)}: {exc}") from None
        ledger.url = redacted(url)
        return ledger

    async def waiting_client(self, wait: float, key: str) -> aioredis.Redis:
        """A client for a write followed by a wait for it on the same connection (WAITAOF):
        its socket timeout covers `wait` seconds more than the ledger's, and it never
        retries, since a retried wait runs on a fresh connection that has written nothing
        and would prove nothing. On Redis Cluster, a client of the master that owns `key`."""
        pipe = self._pipe
        with translated():
            address = pipe.address if isinstance(pipe, RedisPipe) else await pipe.master_of(key)
        return self._server_client(address, pipe.timeout + wait)

    async def servers(self) -> list[tuple[str, aioredis.Redis]]:
        """Each server that takes writes, named for logs, with a client of its own: the one
        Redis, or every master of a Cluster (what durability asks each of them)."""
        pipe = self._pipe
        if isinstance(pipe, RedisPipe):
            assert isinstance(self._redis, aioredis.Redis)
            return [(self.url, self._redis)]
        with translated():
            masters = await pipe.masters()
        return [(master.where, self._server_client(master, pipe.timeout)) for master in masters]

    def moved(self, key: str, host: str, port: int) -> None:
        """A connection of one's own was told the slot of `key` is now served at host:port
        (MOVED): the Cluster's map says so before the next call. Nothing on a single Redis."""
        if not isinstance(self._pipe, RedisPipe):
            self._pipe.moved(key, host, port)

    def _server_client(self, address: Address, timeout: float) -> aioredis.Redis:
        """One client per server and socket timeout, kept for the ledger's life."""
        found = self._waiting.get((address, timeout))
        if found is None:
            found = self._waiting[(address, timeout)] = _client(address, timeout, retry=NO_RETRY)
        return found

    async def unreachable(self) -> str:
        """ "" if the hot path's connection reaches Redis, else why not (for logs: names
        the address and the cause, never the password)."""
        if await self._pipe.ping():
            return ""
        return self._pipe.last_error or "Redis did not answer PING"

    async def close(self) -> None:
        await self._pipe.close()
        await self._redis.aclose()
        for waiting in self._waiting.values():
            await waiting.aclose()

    async def call(self, op: Awaitable[Any]) -> Any:
        """Any redis-py operation off the hot path; Redis unreachable → LedgerUnavailable."""
        with translated():
            return await op

    async def scan_payers(self, count: int = 500) -> AsyncIterator[str]:
        """Every registered payer, a page of about `count` at a time (SSCAN: no order)."""
        with translated():
            async for payer in self._redis.sscan_iter(keyspace.PAYERS, count=count):
                yield payer

    async def run(
        self,
        script: Script,
        keys: tuple[str, ...],
        args: Sequence[str | int],
        parse: Callable[[Any], T],
        within: float | None = None,
    ) -> T:
        """A money script on the hot path, through the pipelined client. Its ARGV starts
        with the deadline (see DEADLINE_SHARE): past it the script refuses, so a caller that
        answered 503 charged nothing. `parse` turns the reply into the result or raises its
        reason. `within`: seconds the caller can still wait (Envoy's deadline)."""
        argv = (deadline_ms(self._pipe.timeout, within), *args)
        try:
            reply = await self._pipe.evalsha(script, keys, argv)
        except RedisPipeError as exc:
            raise unavailable(exc) from exc
        return _parsed(reply, parse)

    async def debit(
        self,
        payer: str,
        nonce: str,
        asset: str,
        amount: int,
        expires_at: int,
        receipt_id: str,
        receipt: dict[str, str | int],
        within: float | None = None,
        retry: Retry | None = None,
        redelivery_limit: int = 0,
    ) -> int | Redelivered:
        """Charge one proof atomically; returns the balance left or raises the reason. A
        retry of a payment already charged (`retry`: its identity and request, recorded
        with the charge) returns what the first charge recorded, at most
        `redelivery_limit` times; then nonce_reused.

        `within`: seconds the caller can still wait (Envoy's deadline)."""
        pairs: list[str | int] = []
        for name, value in receipt.items():
            pairs += (name, value)
        retry = retry or Retry(retries.identity(None, nonce), "")
        keys = (
            keyspace.account(payer),
            keyspace.nonce(payer, nonce),
            keyspace.receipts(payer),
            keyspace.outcome(payer, retry.identity),
        )
        kept = (receipt.get("issued_at", 0), nonce, receipt.get("invoice_id", ""))
        expiry = expires_at + NONCE_GRACE
        args = (asset, amount, expiry, receipt_id, retry.fingerprint, redelivery_limit, *kept)
        return await self.run(scripts.DEBIT, keys, (*args, *pairs), _debited, within)

    async def credit(self, payer: str, asset: str, amount: int, idempotency_key: str) -> Credit:
        if amount <= 0:
            raise X402Error("a credit must be a positive amount")
        result: list[Any] = await self.call(
            self._credit(
                keys=(
                    keyspace.account(payer),
                    keyspace.idempotency(payer, idempotency_key),
                    keyspace.credits(payer),
                ),
                args=(asset, amount, IDEMPOTENCY_TTL, MAX_BALANCE, int(time.time())),
            )
        )
        if result[0] == "unknown_payer":
            raise refusal(UnknownPayer.reason)
        if result[0] == "balance_limit":
            raise X402Error(f"a balance may not exceed {MAX_BALANCE} atomic units")
        return Credit(balance=int(result[1]), applied=result[0] == "ok")

    async def register(self, payer: str) -> bool:
        """Make a payer known (active, zero balance); False if it was registered already."""

        async def op() -> bool:
            created = bool(await self._redis.hsetnx(keyspace.account(payer), "status", ACTIVE))
            await self._redis.sadd(keyspace.PAYERS, payer)
            return created

        return bool(await self.call(op()))

    async def set_status(self, payer: str, status: str) -> None:
        async def op() -> None:
            if not await self._redis.exists(keyspace.account(payer)):
                raise refusal(UnknownPayer.reason)
            await self._redis.hset(keyspace.account(payer), "status", status)

        await self.call(op())

    async def account(self, payer: str) -> Account:
        fields: dict[str, str] = await self.call(self._redis.hgetall(keyspace.account(payer)))
        if not fields:
            raise refusal(UnknownPayer.reason)

        def amounts(prefix: str) -> dict[str, int]:
            return {
                k.removeprefix(prefix): int(v) for k, v in fields.items() if k.startswith(prefix)
            }

        return Account(
            payer,
            fields.get("status", ""),
            amounts("balance:"),
            amounts("credited:"),
            amounts("debited:"),
            amounts("channeled:"),
            {asset: amount for asset, amount in amounts("held:").items() if amount},
        )

    async def receipts(self, payer: str, count: int = 100) -> list[dict[str, str]]:
        return [fields for _id, fields in await self.receipt_page(payer, "", count)]

    async def receipt_page(
        self, payer: str, after: str, count: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to `count` (stream id, receipt facts) of a payer, oldest first, after `after`."""
        start = f"({after}" if after else "-"
        entries: list[tuple[str, dict[str, str]]] = await self.call(
            self._redis.xrange(keyspace.receipts(payer), min=start, count=count)
        )
        return entries

    async def ping(self) -> bool:
        """Whether the hot path's own connection reaches Redis (readiness)."""
        return await self._pipe.ping()


def check_url(url: str) -> None:
    """Raise ValueError if `url` cannot name a ledger (its scheme, query or TLS files), as
    `Ledger.from_url` would, without connecting."""
    if redis_cluster.is_cluster_url(url):
        ClusterPipe(url)
    else:
        RedisPipe(url)


def _client(address: Address, timeout: float, **options: Any) -> aioredis.Redis:
    """redis-py's client for everything but the hot path, at the pipe's address."""
    where: dict[str, Any] = {"host": address.host, "port": address.port}
    if address.path:
        where = {"unix_socket_path": address.path}
    return aioredis.Redis(
        **where,
        db=address.db,
        username=address.username or None,
        password=address.password or None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        health_check_interval=30,
        **redis_cluster.tls_options(address.tls),
        **options,
    )


def unavailable(exc: Exception) -> LedgerUnavailable:
    """The one way Redis failing becomes a reason: fail closed; the exception class tells
    the operator why, without secrets."""
    return LedgerUnavailable(f"ledger unavailable ({exc.__class__.__name__})")


# What a Redis failure looks like from either client: redis-py's errors, the pipelined
# client's, and the socket's own.
REDIS_ERRORS = (RedisError, RedisPipeError, OSError)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis failing inside the block raises LedgerUnavailable (see `unavailable`): the
    ledger's modules wrap every Redis step off the hot path in it (`Ledger.call` does),
    so no Redis error leaves the package. The hot path (`Ledger.run`) maps its one
    client's error itself, without a context manager per check."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise unavailable(exc) from exc


def _parsed(reply: Any, parse: Callable[[Any], T]) -> T:
    if isinstance(reply, list) and reply and reply[0] == DEADLINE_PASSED:
        raise LedgerUnavailable("the ledger answered too late; nothing was charged")
    return parse(reply)


def _debited(result: list[Any]) -> int | Redelivered:
    """The debit script's reply → the balance left (or a retry's recorded outcome), or
    the reason raised."""
    if result[0] == "ok":
        return int(result[1])
    return retried(result)


def retried(result: list[Any]) -> Redelivered:
    """A money script's refusal, or a retry's recorded outcome (lua/money.lua `retried`)."""
    if result[0] == REDELIVERED:
        pairs = [str(value) for value in result[1:]]
        return Redelivered(dict(zip(pairs[::2], pairs[1::2], strict=True)))
    if result[0] == InsufficientFunds.reason:
        raise refusal(result[0], balance=int(result[1]))
    named = (NonceReused.reason, PaymentConflict.reason, PaymentInProgress.reason)
    if result[0] in named and len(result) > 1:
        # The charge whose answer the agent may have lost: its receipt id says it paid.
        raise refusal(result[0], receipt_id=str(result[1]))
    raise refusal(result[0])
