"""`x402 load`'s parent process: discovers the price list, funds the agents, starts every
generator process on one clock, shows the progress and merges what each measured."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from sidecar.core import protocol
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import compile_path
from sidecar.tools.load.plan import (
    SETUP_TIMEOUT,
    TICK,
    LoadConfig,
    Plan,
    Stats,
    Target,
    cpu_now,
    split,
)
from sidecar.tools.load.worker import work

# -- setup (off the clock: httpx is fine here) -------------------------------------------


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
            cpu_before = cpu_now()
            for pipe in pipes:
                pipe.send(("go", started, started + self.config.duration))
            merged = self._collect(pipes, started, tick)
            merged.cpu_seconds += cpu_now() - cpu_before  # the parent's share: progress
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
    tables: list[Any] = [title, head, latency]
    if summary["errors"]:
        errors = Table(title="errors by reason")
        errors.add_column("reason")
        errors.add_column("count", justify="right")
        for reason, count in summary["errors"].items():
            errors.add_row(reason, str(count))
        tables.append(errors)
    statuses = Table(title="responses by status")
    statuses.add_column("status")
    statuses.add_column("count", justify="right")
    for status, count in summary["statuses"].items():
        statuses.add_row(status, str(count))
    tables.append(statuses)
    return Group(*tables)
