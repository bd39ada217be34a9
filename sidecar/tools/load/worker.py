"""`x402 load`'s generator processes: each runs its agents' loops on one event loop (uvloop
where installed), one raw HTTP/1.1 keep-alive connection per agent, its responses parsed
by llhttp (httptools). The proofs are the SDK's (sidecar.agent.proofs): direct ones are
signed before the clock starts, so the measured loop is only I/O."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Coroutine
from multiprocessing.connection import Connection
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from sidecar.agent.proofs import PROOF_HEADER, direct_terms, invoice_in, proof_header
from sidecar.core.errors import InvalidChallenge
from sidecar.core.identity import Identity
from sidecar.tools.load.plan import TICK, Plan, Stats, Target, cpu_now, presign_count


class _Unexpected(Exception):
    """A response that is not the next step of the protocol; `reason` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time (an agent's),
    its responses parsed by llhttp."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop, self.timeout = loop, timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0
        self.body: list[bytes] = []
        self.receipt = False
        self.keep_alive = True

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.keep_alive

    async def exchange(self, request: bytes) -> None:
        """Send one request; returns once its response is complete (status, body, receipt
        set), raises OSError (TimeoutError, ConnectionError) or a parser error."""
        if self.transport is None:
            raise ConnectionResetError("the connection is closed")
        self.status, self.body, self.receipt = 0, [], False
        self.waiter = self.loop.create_future()
        self.timer = self.loop.call_later(self.timeout, self._timed_out)
        self.transport.write(request)
        await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _fail(self, exc: BaseException) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._fail(TimeoutError(f"no answer in {self.timeout:g} s"))
        self.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("the gateway closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-payment-response":
            self.receipt = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.timer is not None:
            self.timer.cancel()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _reason(leg: str, connection: HttpConnection) -> str:
    try:
        error = json.loads(b"".join(connection.body)).get("error")
    except (ValueError, AttributeError):
        error = None
    return f"{leg}: {connection.status} {error or 'unexpected status'}"


class Worker:
    """One generator process: its agents' loops on one event loop, one connection each."""

    def __init__(self, plan: Plan, pipe: Connection) -> None:
        self.plan, self.config, self.pipe = plan, plan.config, pipe
        self.stats = Stats(processes=1)
        self.wallets = [Identity.from_seed_text(seed) for seed in plan.seeds]
        address = urlsplit(self.config.url)
        self.host = address.hostname or "127.0.0.1"
        self.port = address.port or (443 if address.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if address.scheme == "https" else None
        self.prefix = address.path.rstrip("/")
        self.host_header = address.netloc
        self.connections: list[HttpConnection | None] = [None] * len(plan.seeds)
        self.plain: dict[str, bytes] = {}  # fixed paths: the unpaid request, built once
        self.pools: list[list[bytes]] = [[] for _ in plan.seeds]  # direct: pre-signed requests
        self.pool_until = 0.0  # wall-clock time the pre-signed proofs stay valid
        self.started = self.deadline = 0.0
        self.next_start = 0

    def request(self, method: str, path: str, payment: str = "") -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        if payment:
            lines.append(f"{PROOF_HEADER}: {payment}")
        if method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def direct_request(self, target: Target, wallet: Identity, expires_at: int) -> bytes:
        path = target.path()
        terms = direct_terms(
            target.method, path, target.asset.code, target.price, self.plan.payee, expires_at
        )
        _, header = proof_header(terms, wallet)
        return self.request(target.method, path, header)

    async def run(self) -> tuple[Stats, float]:
        plan, config = self.plan, self.config
        loop = asyncio.get_running_loop()
        if config.direct:  # off the clock: the measured loop is then only I/O
            expires_at = int(time.time()) + plan.ttl
            self.pool_until = expires_at - 2.0
            count, targets = presign_count(config), plan.targets
            for slot, wallet in enumerate(self.wallets):
                turn = plan.first + slot
                self.pools[slot] = [
                    self.direct_request(targets[(turn + k) % len(targets)], wallet, expires_at)
                    for k in range(count)
                ]
            self.stats.presigned = count * len(self.wallets)
        for target in plan.targets:
            if "{" not in target.pattern:
                self.plain[target.pattern] = self.request(target.method, target.pattern)
        await asyncio.gather(*(self._connect(slot) for slot in range(len(self.wallets))))
        self.pipe.send(("ready",))
        _, self.started, self.deadline = self.pipe.recv()
        cpu_before = cpu_now()
        reporter = loop.create_task(self._report())
        try:
            await asyncio.gather(*(self._agent(slot) for slot in range(len(self.wallets))))
        finally:
            reporter.cancel()
        ended = time.monotonic()
        self.stats.cpu_seconds = cpu_now() - cpu_before
        for connection in self.connections:
            if connection is not None:
                connection.close()
        return self.stats, ended

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.pipe.send(("tick", self.stats.cleared, dict(self.stats.errors)))

    async def _connect(self, slot: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: HttpConnection(loop, self.config.timeout), self.host, self.port, ssl=self.ssl
        )
        self.connections[slot] = connection
        return connection

    async def _send(self, slot: int, request: bytes) -> HttpConnection:
        connection = self.connections[slot]
        if connection is None or not connection.usable:
            connection = await self._connect(slot)
        await connection.exchange(request)
        return connection

    async def _pace(self) -> bool:
        """Whether to start another loop; with a rate, waits for this loop's slot (the
        processes' slots interleave: together they keep to the one rate)."""
        if self.config.rate:
            slot = (self.next_start * self.plan.processes + self.plan.index) / self.config.rate
            self.next_start += 1
            if self.started + slot >= self.deadline:
                return False
            delay = self.started + slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return time.monotonic() < self.deadline

    async def _agent(self, slot: int) -> None:
        stats, targets = self.stats, self.plan.targets
        turn = first = self.plan.first + slot
        while await self._pace():
            target = targets[turn % len(targets)]
            presigned = turn - first
            turn += 1
            stats.attempted += 1
            began = time.perf_counter()
            try:
                await self._loop(slot, target, presigned)
            except _Unexpected as exc:
                stats.errors[exc.reason] += 1
                continue
            except (OSError, httptools.HttpParserError) as exc:  # counted, not a crash
                stats.errors[f"transport: {exc.__class__.__name__}"] += 1
                connection = self.connections[slot]
                if connection is not None:
                    connection.close()
                continue
            stats.cleared += 1
            stats.charged[target.asset.code] += target.amount
            stats.loop_ms.append((time.perf_counter() - began) * 1000)

    async def _loop(self, slot: int, target: Target, presigned: int) -> None:
        stats, wallet, pool = self.stats, self.wallets[slot], self.pools[slot]
        if self.config.direct:
            if presigned < len(pool) and time.time() < self.pool_until:
                paid_request = pool[presigned]
            else:
                stats.signed_in_loop += 1
                expires_at = int(time.time()) + min(self.plan.ttl, 60)
                paid_request = self.direct_request(target, wallet, expires_at)
        else:
            path = target.pattern if target.pattern in self.plain else target.path()
            request = self.plain.get(path) or self.request(target.method, path)
            began = time.perf_counter()
            challenge = await self._send(slot, request)
            stats.challenge_ms.append((time.perf_counter() - began) * 1000)
            stats.statuses[challenge.status] += 1
            if challenge.status != 402:
                raise _Unexpected(_reason("challenge", challenge))
            try:
                terms = invoice_in(json.loads(b"".join(challenge.body)), None)
            except (ValueError, InvalidChallenge):
                terms = None
            if terms is None:
                raise _Unexpected("challenge: 402 without an invoice")
            stats.signed_in_loop += 1
            _, header = proof_header(terms, wallet)
            paid_request = self.request(target.method, path, header)
        began = time.perf_counter()
        paid = await self._send(slot, paid_request)
        stats.paid_ms.append((time.perf_counter() - began) * 1000)
        stats.statuses[paid.status] += 1
        if paid.status != 200:
            raise _Unexpected(_reason("paid", paid))
        if not paid.receipt:
            raise _Unexpected("paid: 200 without a receipt")


def work(plan: Plan, pipe: Connection) -> None:
    """A generator process's entry point: run its share, send back its Stats."""
    try:
        stats, ended = _event_loop_run(Worker(plan, pipe).run())
        pipe.send(("done", stats, ended))
    except Exception as exc:  # the parent reports it; a traceback here would be lost
        pipe.send(("failed", f"{exc.__class__.__name__}: {exc}"))
    finally:
        pipe.close()


def _event_loop_run(coroutine: Coroutine[Any, Any, tuple[Stats, float]]) -> tuple[Stats, float]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coroutine)
    result: tuple[Stats, float] = uvloop.run(coroutine)  # its CPU per loop is load not sent
    return result
