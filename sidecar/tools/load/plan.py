"""`x402 load`'s plain data: the run's configuration, a priced target, one process's
share (Plan) and the figures each process measures (Stats)."""

from __future__ import annotations

import math
import re
import resource
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.errors import X402Error
from sidecar.core.money import Asset
from sidecar.core.pricing import fill_params

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
        from sidecar.server.config_values import available_cores  # cgroup-aware, as the workers'

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


def split(total: int, count: int) -> list[int]:
    """`total` as `count` near-equal shares, the larger first: 5 over 2 is [3, 2]."""
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def presign_count(config: LoadConfig) -> int:
    """Direct proofs to sign per agent before the clock starts."""
    per_agent = (config.rate or DIRECT_CEILING) / config.concurrency
    return math.ceil(min(per_agent, DIRECT_CEILING_PER_AGENT) * config.duration) + 2


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
