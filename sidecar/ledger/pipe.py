"""A pipelined Redis client for the hot path: one connection, many scripts in flight.

redis-py costs more Python per call than a check's own work, and one pooled connection
per command in flight (docs/performance.md).
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
import os
import ssl
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


# The URL schemes of redis_url, for every error that names them (docs/redis.md).
SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
# TLS files as redis-py names its options, given as query parameters of a rediss:// URL.
TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class TLS:
    """TLS to Redis: the CA that signed the server's certificate ("" for the system's CAs)
    and, for servers that require client certificates, the client's certificate and key."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def context(self) -> ssl.SSLContext:
        """The client side, verifying the server's certificate and host name."""
        files = zip(TLS_PARAMS, (self.ca_file, self.cert_file, self.key_file), strict=True)
        for param, path in files:
            if path and not os.path.isfile(path):
                raise ValueError(f"{param}={path}: no such file")
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS files: {exc.strerror or exc}") from None
        return context


def tls_from_query(scheme: str, query: dict[str, list[str]]) -> TLS | None:
    """The TLS of a URL (`rediss` schemes) from its ssl_* query parameters."""
    params = {name: values[-1] for name, values in query.items() if name in TLS_PARAMS}
    if not scheme.startswith("rediss"):
        if params:
            raise ValueError(f"{', '.join(params)}: TLS options need a rediss:// URL")
        return None
    if params.get("ssl_keyfile") and not params.get("ssl_certfile"):
        raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
    return TLS(
        params.get("ssl_ca_certs", ""),
        params.get("ssl_certfile", ""),
        params.get("ssl_keyfile", ""),
    )


def check_query(query: dict[str, list[str]], allowed: tuple[str, ...]) -> None:
    for name in query:
        if name not in allowed:
            raise ValueError(f"unknown query parameter {name!r} (known: {', '.join(allowed)})")


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    credentials, at, hosts = netloc.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.partition(":")[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{hosts}{slash}{tail}"


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str = ""  # a unix socket instead of host:port
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = 0
    tls: TLS | None = None

    @property
    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


def parse_url(url: str) -> Address:
    """`redis://[[user]:password@]host[:port][/db]`, the same with `rediss://` (TLS; the
    query may name ssl_ca_certs, ssl_certfile, ssl_keyfile), or
    `unix://[[user]:password@]/path?db=N`."""
    components = urlsplit(url)
    query = parse_qs(components.query)
    username, password = unquote(components.username or ""), unquote(components.password or "")
    if components.scheme == "unix":
        check_query(query, ("db",))
        if not components.path:
            raise ValueError("a unix:// Redis URL needs a socket path")
        db = query.get("db", ["0"])[0]
        return Address(path=components.path, username=username, password=password, db=_db(db))
    if components.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"Redis URL scheme must be one of {', '.join(SCHEMES)}, not {components.scheme!r}"
        )
    check_query(query, ("db", *TLS_PARAMS))
    db = components.path.strip("/") or query.get("db", ["0"])[0]
    try:
        port = components.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the Redis URL's port is not a number 1..65535") from None
    return Address(
        host=components.hostname or "127.0.0.1",
        port=port,
        username=username,
        password=password,
        db=_db(db),
        tls=tls_from_query(components.scheme, query),
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

    def __init__(
        self, url: str | Address, timeout: float = 0.5, scripts: tuple[Script, ...] = ()
    ) -> None:
        self.address = url if isinstance(url, Address) else parse_url(url)
        self.timeout = timeout
        self.scripts = scripts
        self._tls = None if self.address.tls is None else self.address.tls.context()
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self.last_error = ""  # why the last connection attempt or ping failed, for logs

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
            reply = await self.call("PING")
        except RedisPipeError as exc:
            self.last_error = str(exc)
            return False
        return bool(reply == "PONG")

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
        if attempt.cancelled():
            return
        error = attempt.exception()
        if error is None:
            self._connection = attempt.result()
        else:
            self.last_error = str(error)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self.address
        connection = _Connection(loop, self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                if address.path:
                    await loop.create_unix_connection(lambda: connection, address.path)
                else:
                    await loop.create_connection(
                        lambda: connection,
                        address.host,
                        address.port,
                        ssl=self._tls,
                        server_hostname=address.host if self._tls else None,
                    )
                await self._setup(connection)
        except TimeoutError:
            connection.abort(ConnectionFailed("closed"))
            raise ConnectionFailed(
                f"cannot connect to Redis at {address.where}: no answer in {self.timeout}s"
            ) from None
        except OSError as exc:  # refused, unreachable, TLS handshake (ssl.SSLError)
            connection.abort(ConnectionFailed("closed"))
            reason = exc.strerror or str(exc) or exc.__class__.__name__
            raise ConnectionFailed(
                f"cannot connect to Redis at {address.where}: {reason}"
            ) from None
        except RedisPipeError:
            connection.abort(ConnectionFailed("closed"))
            raise
        return connection

    async def _setup(self, connection: _Connection) -> None:
        """AUTH, SELECT and the script loads, pipelined like everything else; an error
        reply says which step failed."""
        address = self.address
        setup: list[tuple[str, asyncio.Future[Any]]] = []
        if address.password:
            user = (address.username,) if address.username else ()
            command = ("AUTH", *user, address.password)
            setup.append(("auth", connection.send(hiredis.pack_command(command))))
        if address.db:
            command = ("SELECT", address.db)
            setup.append(("select", connection.send(hiredis.pack_command(command))))
        for script in self.scripts:
            command = ("SCRIPT", "LOAD", script.source)
            setup.append(("script", connection.send(hiredis.pack_command(command))))
        # Every reply, so none is left unread when one step fails.
        replies = await asyncio.gather(*(reply for _, reply in setup), return_exceptions=True)
        for (step, _), reply in zip(setup, replies, strict=True):
            if not isinstance(reply, BaseException):
                continue
            where = address.where
            if step == "select":
                raise ReplyError(
                    f"Redis at {where} has no database {address.db} ({reply}): check the "
                    "database number of redis_url"
                )
            if step == "auth":
                raise ReplyError(f"Redis at {where} refused the credentials ({reply})")
            raise reply
