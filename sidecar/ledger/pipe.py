"""A pipelined Redis client for the hot path: one connection, many scripts in flight.

redis-py costs ~30 µs of Python per call and one pooled connection per command in flight.
Here every call is written to one connection as it comes and Redis answers strictly in
order, so each reply goes to the oldest waiting call: hundreds of debits share a single
socket for a few µs each. Only the hot path needs this; admin operations use redis-py.

Failure rules, all surfacing as `RedisPipeError` (the ledger maps it to 503):
- a caller that stops waiting (Envoy timed out the check) leaves its slot in the queue, so
  its reply is read and never handed to the next caller: it is dropped, or given to the
  `late` listener the caller left, so the outcome of a script it started is not lost;
- when the oldest reply is overdue by `timeout`, the connection is presumed dead: it is
  aborted and every waiting call fails; the next call reconnects;
- after a Redis restart or SCRIPT FLUSH, scripts are loaded again (on connect, and on
  NOSCRIPT) and the call is retried: NOSCRIPT means the script did not run.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

DEFAULT_PORT = 6379


class RedisPipeError(Exception):
    """Redis could not answer: connection refused or lost, timed out, or an error reply."""


class ConnectionFailed(RedisPipeError):
    pass


class ReplyError(RedisPipeError):
    """An error reply from Redis, such as NOSCRIPT or a script error."""


@dataclass(frozen=True)
class Script:
    """A Lua script called by its SHA1; the source is kept to load it again."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""  # a unix socket instead of host:port
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = 0


def parse_url(url: str) -> Address:
    """`redis://[[user]:password@]host[:port][/db]` or `unix://[[user]:password@]/path?db=N`."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    username, password = unquote(parts.username or ""), unquote(parts.password or "")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        db = query.get("db", ["0"])[0]
        return Address(path=parts.path, username=username, password=password, db=_db(db))
    if parts.scheme != "redis":
        raise ValueError(f"Redis URL scheme must be redis:// or unix://, not {parts.scheme!r}")
    db = parts.path.strip("/") or query.get("db", ["0"])[0]
    return Address(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or DEFAULT_PORT,
        username=username,
        password=password,
        db=_db(db),
    )


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"Redis database must be a number, not {text!r}")
    return int(text)


class _Connection(asyncio.Protocol):
    """One socket: commands out in call order, replies matched to callers in that order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ReplyError)
        # Per command in flight: its caller's future, its deadline, and who to tell if the
        # caller gave up before the reply (None: nobody).
        self.waiting: collections.deque[
            tuple[asyncio.Future[Any], float, Callable[[Any], None] | None]
        ] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.out: list[bytes] = []  # commands of this loop iteration, sent in one write
        self.watchdog: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader, waiting = self.reader, self.waiting
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                future, _, late = waiting.popleft()
                if future.done():  # its caller gave up: keep the order, tell `late`
                    if late is not None:
                        late(reply)
                    continue
                if isinstance(reply, ReplyError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked
            self.abort(ConnectionFailed(f"Redis stream out of step ({exc.__class__.__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(ConnectionFailed("connection to Redis lost"))

    # -- calls -------------------------------------------------------------------------
    def send(
        self, command: bytes, late: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply, or `late` if the future was
        cancelled by then."""
        if self.closed:
            raise ConnectionFailed("connection to Redis closed")
        future = self.loop.create_future()
        self.waiting.append((future, self.loop.time() + self.timeout, late))
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(command)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(self.waiting[0][1], self.check_overdue)
        return future

    def flush(self) -> None:
        # Checks that ran in the same loop iteration share one write (one syscall).
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def check_overdue(self) -> None:
        self.watchdog = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        if deadline <= self.loop.time():
            self.abort(ConnectionFailed("Redis did not answer in time"))
        else:
            self.watchdog = self.loop.call_at(deadline, self.check_overdue)

    def abort(self, error: RedisPipeError) -> None:
        """Fail every waiting call and drop the socket; the client reconnects on next use."""
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future, _, late = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
            elif late is not None:
                late(error)
        self.out.clear()


class RedisPipe:
    """The client: `call` any command, `evalsha` a registered script. Connects lazily."""

    def __init__(self, url: str, timeout: float = 0.5, scripts: tuple[Script, ...] = ()) -> None:
        self.address = parse_url(url)
        self.timeout = timeout
        self.scripts = scripts
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(
        self,
        *args: str | int | bytes,
        late: Callable[[Any], None] | None = None,
        asking: bool = False,
    ) -> Any:
        """Send one command and wait for its reply. If the caller is cancelled after the
        command left, `late` gets the reply (or the connection's error) when it comes.

        `asking`: Redis Cluster sent ASK (the slot is migrating here), so ASKING must
        precede the command on this connection; both are queued in this one step, so no
        other caller's command comes between them."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        if asking:
            allowed = connection.send(hiredis.pack_command(("ASKING",)))
            reply = connection.send(hiredis.pack_command(args), late)
            return (await asyncio.gather(allowed, reply))[1]
        future = connection.send(hiredis.pack_command(args), late)
        try:
            return await future
        except asyncio.CancelledError:
            # Cancelled after the reply came but before this task resumed: the slot is
            # gone, so `late` hears it here.
            if late is not None and future.done() and not future.cancelled():
                late(future.exception() or future.result())
            raise

    async def evalsha(
        self,
        script: Script,
        keys: tuple[str, ...],
        args: tuple[str | int, ...],
        late: Callable[[Any], None] | None = None,
        asking: bool = False,
    ) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.call(*command, late=late, asking=asking)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Redis lost its scripts (SCRIPT FLUSH): the script did not run, so load and retry.
        await self.call("SCRIPT", "LOAD", script.source)
        return await self.call(*command, late=late, asking=asking)

    async def ping(self) -> bool:
        try:
            return bool(await self.call("PING") == "PONG")
        except RedisPipeError:
            return False

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.abort(ConnectionFailed("client closed"))
            self._connection = None

    async def _connect(self) -> _Connection:
        # Every caller arriving while Redis is unreachable shares one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future[_Connection]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        connection = _Connection(loop, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                if address.path:
                    await loop.create_unix_connection(lambda: connection, address.path)
                else:
                    await loop.create_connection(lambda: connection, address.host, address.port)
                # Pipelined like everything else: AUTH, SELECT and the script loads.
                setup = []
                if address.password:
                    user = (address.username,) if address.username else ()
                    setup.append(
                        connection.send(hiredis.pack_command(("AUTH", *user, address.password)))
                    )
                if address.db:
                    setup.append(connection.send(hiredis.pack_command(("SELECT", address.db))))
                setup += [
                    connection.send(hiredis.pack_command(("SCRIPT", "LOAD", s.source)))
                    for s in self.scripts
                ]
                for reply in setup:
                    await reply
        except (OSError, TimeoutError) as exc:
            connection.abort(ConnectionFailed("closed"))
            raise ConnectionFailed(f"cannot connect to Redis ({exc.__class__.__name__})") from None
        except RedisPipeError:
            connection.abort(ConnectionFailed("closed"))
            raise
        return connection
