"""`x402 load`: push priced routes with many simulated agents and count the challenge loops
the stack clears.

Each agent has its own wallet, registered and credited in the ledger before the run. An
agent's loop is the real protocol: GET → 402 with an invoice → sign → retry → 200 with a
receipt (or, with `direct`, one signed request from the price list). Every status that
is not the expected one is counted under its reason, so a summary always adds up:
attempted loops = cleared loops + errors.

The generator must not be what limits the run. The loops run in several processes
(default: one per core), each an event loop (uvloop where installed) driving raw HTTP/1.1
keep-alive connections whose responses llhttp parses (httptools): one process on httpx
spent ~2.5 ms of CPU per loop and saturated its core while the stack idled. The parent
discovers the price list, funds the agents, starts every process on one clock, shows the
progress and merges what each process measured, its own CPU included.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import re
import resource
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from sidecar.core import protocol
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import compile_path, fill_params

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
TICK = 0.25  # seconds between progress reports
# Direct proofs are signed before the clock starts, enough for this many loops per second
# (over all agents, and per agent's connection) unless --rate says fewer; an agent that
# runs out signs the rest inside its loop, and the summary counts them.
DIRECT_CEILING = 5_000
DIRECT_CEILING_PER_AGENT = 2_000
SETUP_TIMEOUT = 120.0  # seconds for the processes to start, connect and pre-sign


def parse_duration(text: str) -> float:
    """Seconds from "30", "30s", "1.5m", "500ms" or "1h"."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise X402Error(f"duration {text!r}: write it like 30s, 2m or 500ms")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class Target:
    """A priced route from the gateway's price list."""

    method: str
    pattern: str  # "/api/v1/trade/verify/{trade_id}"
    price: str  # decimal, as agents send it
    asset: Asset
    amount: int  # atomic

    def path(self) -> str:
        """A concrete path: every {param} gets a fresh value, as distinct agent calls would."""
        return fill_params(self.pattern, lambda: secrets.token_hex(4))


@dataclass(frozen=True)
class LoadConfig:
    url: str  # the gateway, where agents connect (Envoy)
    redis_url: str  # the ledger, to register and credit the agents beforehand
    routes: tuple[str, ...]  # "PATH", "METHOD PATH" or a concrete path of a priced route
    duration: float = 10.0
    concurrency: int = 16
    agents: int = 0  # wallets; 0: one per concurrent loop
    direct: bool = False  # one signed request from the price list instead of the 402 first
    rate: float = 0.0  # loops started per second at most; 0: as fast as the stack answers
    fund: str = ""  # per agent; "": enough for 100,000 loops of the dearest route
    timeout: float = 10.0
    processes: int = 0  # generator processes; 0: one per core (never more than concurrency)

    def process_count(self) -> int:
        from sidecar.server.config import available_cores  # cgroup-aware, as the workers'

        return max(1, min(self.processes or available_cores(), self.concurrency))


@dataclass
class Stats:
    attempted: int = 0
    cleared: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)  # every response, by status
    challenge_ms: list[float] = field(default_factory=list)
    paid_ms: list[float] = field(default_factory=list)
    loop_ms: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    charged: Counter[str] = field(default_factory=Counter)  # atomic units per asset
    processes: int = 0
    cpu_seconds: float = 0.0  # user + system of the generator's processes while measuring
    presigned: int = 0  # direct proofs signed before the clock started
    signed_in_loop: int = 0  # proofs signed inside a measured loop

    def merge(self, other: Stats) -> None:
        """Add another process's figures (elapsed is the caller's: one clock for all)."""
        self.attempted += other.attempted
        self.cleared += other.cleared
        self.errors.update(other.errors)
        self.statuses.update(other.statuses)
        self.challenge_ms.extend(other.challenge_ms)
        self.paid_ms.extend(other.paid_ms)
        self.loop_ms.extend(other.loop_ms)
        self.charged.update(other.charged)
        self.processes += other.processes
        self.cpu_seconds += other.cpu_seconds
        self.presigned += other.presigned
        self.signed_in_loop += other.signed_in_loop

    def summary(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "cleared": self.cleared,
            "errors": dict(self.errors.most_common()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.elapsed, 3),
            "loops_per_second": round(self.cleared / self.elapsed, 1) if self.elapsed else 0.0,
            "charged_atomic": dict(self.charged),
            "challenge_ms": percentiles(self.challenge_ms),
            "paid_ms": percentiles(self.paid_ms),
            "loop_ms": percentiles(self.loop_ms),
            "processes": self.processes,
            "generator_cpu": generator_cpu(self.cpu_seconds, self.elapsed, self.cleared),
            "proofs": {"presigned": self.presigned, "signed_in_loop": self.signed_in_loop},
        }


def percentiles(samples: list[float]) -> dict[str, float | None]:
    ordered = sorted(samples)

    def at(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": at(1.0)}


def generator_cpu(cpu_seconds: float, elapsed: float, cleared: int) -> dict[str, float | None]:
    """The generator's own CPU while measuring: cores it kept busy and µs per cleared loop."""
    return {
        "cpu_seconds": round(cpu_seconds, 3),
        "cores": round(cpu_seconds / elapsed, 3) if elapsed else None,
        "us_per_loop": round(cpu_seconds * 1e6 / cleared, 1) if cleared else None,
    }


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal shares, the larger first: 5 over 2 is [3, 2]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def presign_count(config: LoadConfig) -> int:
    """Direct proofs to sign per agent before the clock starts."""
    per_agent = (config.rate or DIRECT_CEILING) / config.concurrency
    return math.ceil(min(per_agent, DIRECT_CEILING_PER_AGENT) * config.duration) + 2


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- setup (parent, off the clock: httpx is fine here) -----------------------------------


async def discover(url: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        response = await client.get(protocol.DISCOVERY_PATH)
    if response.status_code != 200:
        raise X402Error(
            f"no price list at {url.rstrip('/')}/.well-known/x402 ({response.status_code})"
        )
    document: dict[str, Any] = response.json()
    return document


def resolve(document: dict[str, Any], wanted: tuple[str, ...]) -> list[Target]:
    """Match each --route against the price list: PATTERN, METHOD PATTERN or a concrete path
    (a pattern's {params} get fresh values on every loop; a concrete path is used as is)."""
    assets = {a["asset"]: Asset(a["asset"], int(a["decimals"])) for a in document["assets"]}
    targets = []
    for spec in wanted:
        method, _, path = spec.strip().rpartition(" ")
        method = method.strip().upper()
        for route in document["routes"]:
            if method and route["method"] not in (method, "*"):
                continue
            if route["path"] == path or compile_path(route["path"]).fullmatch(path):
                verb = method or ("GET" if route["method"] == "*" else route["method"])
                asset = assets[route["asset"]]
                price = route["price"]
                targets.append(Target(verb, path, price, asset, asset.to_atomic(price)))
                break
        else:
            known = ", ".join(f"{r['method']} {r['path']}" for r in document["routes"])
            raise X402Error(f"route {spec!r} is not in the price list ({known or 'empty'})")
    return targets


async def fund_agents(redis_url: str, count: int, credits: dict[str, int]) -> list[Identity]:
    """Fresh wallets, registered and credited (atomic units per asset) before the run."""
    from sidecar.ledger.accounts import Ledger

    wallets = [Identity.generate() for _ in range(count)]
    ledger = Ledger.from_url(redis_url)
    try:

        async def one(wallet: Identity) -> None:
            await ledger.register(wallet.public_key)
            for asset, amount in credits.items():
                await ledger.credit(wallet.public_key, asset, amount, f"load-{wallet.kid}")

        for start in range(0, count, 64):
            await asyncio.gather(*(one(w) for w in wallets[start : start + 64]))
    finally:
        await ledger.close()
    return wallets


@dataclass(frozen=True)
class Plan:
    """One generator process's share of the run (sent to it, so plain picklable data)."""

    config: LoadConfig
    targets: tuple[Target, ...]
    seeds: tuple[str, ...]  # the wallet of each of its agents
    first: int  # the run-wide index of its first agent
    index: int  # which process
    processes: int
    payee: str
    ttl: int  # the gateway's max_direct_ttl_seconds


class Runner:
    """The parent: sets up, starts one `Worker` per process, merges their Stats."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config

    def plans(
        self, document: dict[str, Any], targets: tuple[Target, ...], wallets: list[Identity]
    ) -> list[Plan]:
        config, count = self.config, self.config.process_count()
        seeds = [wallets[i % len(wallets)].seed_text for i in range(config.concurrency)]
        plans, first = [], 0
        for index, agents in enumerate(split(config.concurrency, count)):
            share = tuple(seeds[first : first + agents])
            payee, ttl = document["payee"], int(document["max_direct_ttl_seconds"])
            plans.append(Plan(config, targets, share, first, index, count, payee, ttl))
            first += agents
        return plans

    async def _setup(self) -> list[Plan]:
        config = self.config
        document = await discover(config.url)
        targets = tuple(resolve(document, config.routes))
        credits: Counter[str] = Counter()
        for target in targets:
            amount = target.asset.to_atomic(config.fund) if config.fund else target.amount * 100_000
            credits[target.asset.code] = max(credits[target.asset.code], amount)
        wallets = await fund_agents(
            config.redis_url, config.agents or config.concurrency, dict(credits)
        )
        return self.plans(document, targets, wallets)

    def run(self, tick: Callable[[Stats, float], None] | None = None) -> Stats:
        plans = asyncio.run(self._setup())
        # spawn, not fork: the parent may already run threads (the progress display's)
        context = multiprocessing.get_context("spawn")
        pipes: list[Connection] = []
        processes = []
        try:
            for plan in plans:
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=work, args=(plan, theirs), name=f"x402-load-{plan.index}", daemon=True
                )
                process.start()
                theirs.close()
                pipes.append(ours)
                processes.append(process)
            for pipe in pipes:
                _expect(pipe, "ready", SETUP_TIMEOUT)
            started = time.monotonic()
            cpu_before = _cpu_now()
            for pipe in pipes:
                pipe.send(("go", started, started + self.config.duration))
            merged = self._collect(pipes, started, tick)
            merged.cpu_seconds += _cpu_now() - cpu_before  # the parent's share: progress
        finally:
            for pipe in pipes:
                pipe.close()
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
                    process.join()
        if tick:
            tick(merged, merged.elapsed)
        return merged

    def _collect(
        self, pipes: list[Connection], started: float, tick: Callable[[Stats, float], None] | None
    ) -> Stats:
        """Until every process is done: relay their progress to `tick`, then merge."""
        progress: dict[int, tuple[int, Counter[str]]] = {}
        finished: list[float] = []
        merged = Stats()
        pending = {id(pipe): pipe for pipe in pipes}
        deadline = started + self.config.duration + self.config.timeout + 30
        next_tick = started + TICK
        while pending:
            if time.monotonic() > deadline:
                raise X402Error("x402 load: a generator process did not finish in time")
            for ready in wait(list(pending.values()), timeout=TICK):
                pipe = cast(Connection, ready)
                message = _receive(pipe)
                if message[0] == "tick":
                    progress[id(pipe)] = (message[1], Counter(message[2]))
                elif message[0] == "done":
                    stats, ended = cast(Stats, message[1]), cast(float, message[2])
                    merged.merge(stats)
                    finished.append(ended)
                    progress[id(pipe)] = (stats.cleared, stats.errors)
                    del pending[id(pipe)]
            now = time.monotonic()
            if tick and pending and now >= next_tick:
                view = Stats(cleared=sum(c for c, _ in progress.values()))
                for _, errors in progress.values():
                    view.errors.update(errors)
                tick(view, now - started)
                next_tick = now + TICK
        merged.elapsed = max(finished) - started
        return merged


def _receive(pipe: Connection) -> tuple[Any, ...]:
    try:
        message = cast(tuple[Any, ...], pipe.recv())
    except EOFError:
        raise X402Error("x402 load: a generator process died") from None
    if message[0] == "failed":
        raise X402Error(f"x402 load: a generator process failed: {message[1]}")
    return message


def _expect(pipe: Connection, kind: str, timeout: float) -> tuple[Any, ...]:
    if not pipe.poll(timeout):
        raise X402Error(f"x402 load: no {kind!r} from a generator process in {timeout:.0f} s")
    message = _receive(pipe)
    if message[0] != kind:
        raise X402Error(f"x402 load: expected {kind!r} from a generator process, got {message[0]}")
    return message


# -- the generator processes ---------------------------------------------------------------


class _Unexpected(Exception):
    """A response that is not the next step of the protocol; `reason` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Connection(asyncio.Protocol):
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


def _reason(leg: str, connection: _Connection) -> str:
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
        self.connections: list[_Connection | None] = [None] * len(plan.seeds)
        self.plain: dict[str, bytes] = {}  # fixed paths: the unpaid request, built once
        self.pools: list[list[bytes]] = [[] for _ in plan.seeds]  # direct: pre-signed requests
        self.pool_until = 0.0  # wall-clock time the pre-signed proofs stay valid
        self.started = self.deadline = 0.0
        self.next_start = 0

    def request(self, method: str, path: str, payment: str = "") -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host_header}"]
        if payment:
            lines.append(f"X-Payment: {payment}")
        if method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def direct_request(self, target: Target, wallet: Identity, expires_at: int) -> bytes:
        path = target.path()
        terms = protocol.direct_terms(
            f"{target.method} {path}", target.asset.code, target.price, self.plan.payee, expires_at
        )
        header = protocol.encode_header(protocol.sign_proof(terms, wallet))
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
        cpu_before = _cpu_now()
        reporter = loop.create_task(self._report())
        try:
            await asyncio.gather(*(self._agent(slot) for slot in range(len(self.wallets))))
        finally:
            reporter.cancel()
        ended = time.monotonic()
        self.stats.cpu_seconds = _cpu_now() - cpu_before
        for connection in self.connections:
            if connection is not None:
                connection.close()
        return self.stats, ended

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.pipe.send(("tick", self.stats.cleared, dict(self.stats.errors)))

    async def _connect(self, slot: int) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(loop, self.config.timeout), self.host, self.port, ssl=self.ssl
        )
        self.connections[slot] = connection
        return connection

    async def _send(self, slot: int, request: bytes) -> _Connection:
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
                terms = json.loads(b"".join(challenge.body))["x402"]
            except (ValueError, KeyError, TypeError):
                raise _Unexpected("challenge: 402 without an invoice") from None
            stats.signed_in_loop += 1
            header = protocol.encode_header(protocol.sign_proof(terms, wallet))
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


def run(config: LoadConfig, tick: Callable[[Stats, float], None] | None = None) -> Stats:
    return Runner(config).run(tick)


def main(config: LoadConfig, json_path: str | None = None, progress: bool = True) -> Stats:
    """Run with a live progress bar, print the summary, optionally write it as JSON."""
    from collections import deque

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console()
    bar = Progress(
        TextColumn("[bold]x402 load[/]"),
        BarColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[rate]:>8.1f} loops/s"),
        TextColumn("{task.fields[cleared]:>8} cleared"),
        TextColumn("{task.fields[errors]:>6} errors"),
        console=console,
        disable=not progress,
    )
    task = bar.add_task("load", total=config.duration, rate=0.0, cleared=0, errors=0)
    recent: deque[tuple[float, int]] = deque(maxlen=5)  # ~1 s of ticks: the live rate

    def tick(stats: Stats, elapsed: float) -> None:
        recent.append((elapsed, stats.cleared))
        (t0, c0), (t1, c1) = recent[0], recent[-1]
        rate = (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
        errors = sum(stats.errors.values())
        bar.update(
            task,
            completed=min(elapsed, config.duration),
            rate=rate,
            cleared=stats.cleared,
            errors=errors,
        )

    with bar:
        stats = run(config, tick)
    summary = stats.summary()
    console.print(render_summary(summary, config))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
            out.write("\n")
    return stats


def render_summary(summary: dict[str, Any], config: LoadConfig) -> Any:
    from rich.console import Group
    from rich.rule import Rule
    from rich.table import Table

    mode = "direct payments" if config.direct else "challenge loops"
    title = Rule(
        f"x402 load: {mode}, {config.concurrency} concurrent, {summary['processes']} processes",
        align="left",
    )
    head = Table(show_header=False)
    head.add_row("cleared loops", str(summary["cleared"]))
    head.add_row("loops/s", f"{summary['loops_per_second']:.1f}")
    head.add_row("attempted", str(summary["attempted"]))
    head.add_row("errors", str(sum(summary["errors"].values())))
    head.add_row("seconds", f"{summary['seconds']:.1f}")
    cpu = summary["generator_cpu"]
    if cpu["cores"] is not None:
        per_loop = f", {cpu['us_per_loop']:.0f} µs/loop" if cpu["us_per_loop"] else ""
        head.add_row("generator CPU", f"{cpu['cores']:.2f} cores{per_loop}")
    latency = Table(title="latency (ms)")
    for column in ("leg", "p50", "p95", "p99", "max"):
        latency.add_column(column, justify="right" if column != "leg" else "left")
    for leg in ("challenge", "paid", "loop"):
        values = summary[f"{leg}_ms"]
        if values["p50"] is not None:
            latency.add_row(leg, *(f"{values[k]:.2f}" for k in ("p50", "p95", "p99", "max")))
    parts: list[Any] = [title, head, latency]
    if summary["errors"]:
        errors = Table(title="errors by reason")
        errors.add_column("reason")
        errors.add_column("count", justify="right")
        for reason, count in summary["errors"].items():
            errors.add_row(reason, str(count))
        parts.append(errors)
    statuses = Table(title="responses by status")
    statuses.add_column("status")
    statuses.add_column("count", justify="right")
    for status, count in summary["statuses"].items():
        statuses.add_row(status, str(count))
    parts.append(statuses)
    return Group(*parts)
