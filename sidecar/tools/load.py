"""`x402 load`: push priced routes with many simulated agents and count the challenge loops
the stack clears.

Each agent has its own wallet, registered and credited in the ledger before the run. An
agent's loop is the real protocol: GET → 402 with an invoice → sign → retry → 200 with a
receipt (or, with `direct`, one signed request from the price list). Every status that
is not the expected one is counted under its reason, so a summary always adds up:
attempted loops = cleared loops + errors.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar.core import protocol
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import compile_path, fill_params
from sidecar.ledger.accounts import Ledger

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
        }


def percentiles(samples: list[float]) -> dict[str, float | None]:
    ordered = sorted(samples)

    def at(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": at(1.0)}


class _Unexpected(Exception):
    """A response that is not the next step of the protocol; `reason` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(leg: str, response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return f"{leg}: {response.status_code} {error or 'unexpected status'}"


async def discover(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(protocol.DISCOVERY_PATH)
    if response.status_code != 200:
        raise X402Error(
            f"no price list at {client.base_url}/.well-known/x402 ({response.status_code})"
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


class Runner:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.started = 0.0
        self.deadline = 0.0
        self.next_start = 0
        self.urls: dict[str, httpx.URL] = {}

    async def run(self, tick: Callable[[Stats, float], None] | None = None) -> Stats:
        config = self.config
        limits = httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        )
        async with httpx.AsyncClient(
            base_url=config.url, timeout=config.timeout, limits=limits
        ) as client:
            document = await discover(client)
            targets = resolve(document, config.routes)
            credits: Counter[str] = Counter()
            for target in targets:
                amount = (
                    target.asset.to_atomic(config.fund) if config.fund else target.amount * 100_000
                )
                credits[target.asset.code] = max(credits[target.asset.code], amount)
            wallets = await fund_agents(
                config.redis_url, config.agents or config.concurrency, dict(credits)
            )
            payee, ttl = document["payee"], int(document["max_direct_ttl_seconds"])
            self.started = time.perf_counter()
            self.deadline = self.started + config.duration
            ticker = asyncio.ensure_future(self._tick(tick)) if tick else None
            try:
                await asyncio.gather(
                    *(
                        self._agent(client, wallets[i % len(wallets)], targets, i, payee, ttl)
                        for i in range(config.concurrency)
                    )
                )
            finally:
                if ticker is not None:
                    ticker.cancel()
            self.stats.elapsed = time.perf_counter() - self.started
            if tick:
                tick(self.stats, self.stats.elapsed)
        return self.stats

    async def _tick(self, tick: Callable[[Stats, float], None]) -> None:
        while True:
            await asyncio.sleep(0.25)
            tick(self.stats, time.perf_counter() - self.started)

    async def _pace(self) -> bool:
        """Whether to start another loop; with a rate, waits for this loop's slot."""
        if self.config.rate:
            slot = self.started + self.next_start / self.config.rate
            self.next_start += 1
            if slot >= self.deadline:
                return False
            delay = slot - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        return time.perf_counter() < self.deadline

    async def _agent(
        self,
        client: httpx.AsyncClient,
        wallet: Identity,
        targets: list[Target],
        index: int,
        payee: str,
        ttl: int,
    ) -> None:
        stats, turn = self.stats, index
        while await self._pace():
            target = targets[turn % len(targets)]
            turn += 1
            stats.attempted += 1
            began = time.perf_counter()
            try:
                await self._loop(client, wallet, target, payee, ttl)
            except _Unexpected as exc:
                stats.errors[exc.reason] += 1
                continue
            except httpx.HTTPError as exc:  # a transport failure is an error, not a crash
                stats.errors[f"transport: {exc.__class__.__name__}"] += 1
                continue
            stats.cleared += 1
            stats.charged[target.asset.code] += target.amount
            stats.loop_ms.append((time.perf_counter() - began) * 1000)

    async def _loop(
        self, client: httpx.AsyncClient, wallet: Identity, target: Target, payee: str, ttl: int
    ) -> None:
        stats, path = self.stats, target.path()
        # A string URL is parsed on every request (~60 µs); a fixed path's only once.
        url = self.urls.get(path) or httpx.URL(self.config.url.rstrip("/") + path)
        if "{" not in target.pattern:
            self.urls[path] = url
        if self.config.direct:
            terms = protocol.direct_terms(
                f"{target.method} {path}",
                target.asset.code,
                target.price,
                payee,
                int(time.time()) + min(ttl, 60),
            )
        else:
            began = time.perf_counter()
            challenge = await client.request(target.method, url)
            stats.challenge_ms.append((time.perf_counter() - began) * 1000)
            stats.statuses[challenge.status_code] += 1
            if challenge.status_code != 402:
                raise _Unexpected(_reason("challenge", challenge))
            try:
                terms = challenge.json()["x402"]
            except (ValueError, KeyError, TypeError):
                raise _Unexpected("challenge: 402 without an invoice") from None
        header = protocol.encode_header(protocol.sign_proof(terms, wallet))
        began = time.perf_counter()
        paid = await client.request(target.method, url, headers={"X-Payment": header})
        stats.paid_ms.append((time.perf_counter() - began) * 1000)
        stats.statuses[paid.status_code] += 1
        if paid.status_code != 200:
            raise _Unexpected(_reason("paid", paid))
        if "x-payment-response" not in paid.headers:
            raise _Unexpected("paid: 200 without a receipt")


async def run(config: LoadConfig, tick: Callable[[Stats, float], None] | None = None) -> Stats:
    return await Runner(config).run(tick)


def main(config: LoadConfig, json_path: str | None = None, progress: bool = True) -> Stats:
    """Run with a live progress bar, print the summary, optionally write it as JSON."""
    import json
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
        stats = _event_loop_run(run(config, tick))
    summary = stats.summary()
    console.print(render_summary(summary, config))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
            out.write("\n")
    return stats


def _event_loop_run(coroutine: Coroutine[Any, Any, Stats]) -> Stats:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(coroutine)
    result: Stats = uvloop.run(coroutine)  # the runner's own overhead is load on the stack
    return result


def render_summary(summary: dict[str, Any], config: LoadConfig) -> Any:
    from rich.console import Group
    from rich.rule import Rule
    from rich.table import Table

    mode = "direct payments" if config.direct else "challenge loops"
    title = Rule(f"x402 load: {mode}, {config.concurrency} concurrent", align="left")
    head = Table(show_header=False)
    head.add_row("cleared loops", str(summary["cleared"]))
    head.add_row("loops/s", f"{summary['loops_per_second']:.1f}")
    head.add_row("attempted", str(summary["attempted"]))
    head.add_row("errors", str(sum(summary["errors"].values())))
    head.add_row("seconds", f"{summary['seconds']:.1f}")
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
