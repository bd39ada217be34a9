"""Prometheus metrics: decisions, revenue, check latency, ledger errors, settlement lag,
the ledger's memory, admin authentication failures.

The hot path calls `record` once per check. Label children are created once per label
combination and kept in a dict, so a check costs a dict lookup and a few increments.

Several worker processes (server.py forks them) aggregate through prometheus-client's
multiprocess mode: each process writes its samples to an mmap file in one directory and
`/metrics` (worker 0's side port) merges them. prometheus-client picks its value class
when it is imported, so the supervisor calls `use_multiprocess` before forking and the
metric objects are (re)built then, whatever was imported earlier.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.core.pricing import Price
from sidecar.ledger.reports import Memory

CONTENT_TYPE = CONTENT_TYPE_LATEST
LEDGER_UNAVAILABLE = "ledger_unavailable"
# Checks take ~0.2-2 ms; the buckets resolve that range and show the timeouts beyond.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.decisions = Counter(
            "x402_decisions",
            "Payment checks by decision (allow/deny), reason and route.",
            ("decision", "reason", "route"),
            registry=registry,
        )
        self.revenue = Counter(
            "x402_revenue_atomic",
            "Amount charged, in atomic units of the asset (proofs and channel vouchers).",
            ("asset", "route"),
            registry=registry,
        )
        self.latency = Histogram(
            "x402_check_latency_seconds",
            "Time the sidecar took to answer one ext_authz check.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ledger_errors = Counter(
            "x402_ledger_errors",
            "Checks that failed closed because the ledger (Redis) did not answer.",
            registry=registry,
        )
        self.admin_auth_failures = Counter(
            "x402_admin_auth_failures",
            "Refused admin credentials: the admin API's bearer token (api=grpc), the "
            "dashboard's login form or bearer header (api=dashboard).",
            ("api",),
            registry=registry,
        )
        self.facilitator_not_reached = Counter(
            "x402_facilitator_not_reached",
            "Requests to an x402 facilitator that never reached it, by its host and what "
            "was seen (unreachable, 401, 403, credentials_unusable); the next one was asked.",
            ("facilitator", "status"),
            registry=registry,
        )
        self.reconcile_repairs = Counter(
            "x402_reconcile_repairs",
            "Top-ups paid on chain that the ledger had lost, credited by reconciliation.",
            registry=registry,
        )
        self.decision_children: dict[tuple[str, str, str], Any] = {}
        self.revenue_children: dict[tuple[str, str], Any] = {}

    def decision(self, decision: str, reason: str, route: str) -> None:
        key = (decision, reason, route)
        child = self.decision_children.get(key)
        if child is None:
            child = self.decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def charge(self, asset: str, route: str, amount: int) -> None:
        key = (asset, route)
        child = self.revenue_children.get(key)
        if child is None:
            child = self.revenue_children[key] = self.revenue.labels(*key)
        child.inc(amount)


_current = _Metrics(CollectorRegistry())
_multiprocess_dir: str | None = None
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


# prometheus-client asks for the process id on every value update, to notice a fork: a
# getpid syscall each, four a check. The id only changes at a fork, so it is kept here.
os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """This process's id, as of its last fork (os.getpid without the syscall)."""
    return _pid


def use_multiprocess(directory: str) -> None:
    """Aggregate across processes through files in `directory` (fresh and empty); call
    before forking the workers."""
    global _current, _multiprocess_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus-client chose its value class when imported; choose again, now (what
    # get_value_class would pick with the variable set, but with the kept process id).
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]
    _multiprocess_dir = directory
    _current = _Metrics(None)  # multiprocess metrics live in the files, not a registry


def record(line: Mapping[str, Any], price: Price | None, charged: int, seconds: float) -> None:
    """One check: the decision log line (decision, reason), its price if priced, and the
    atomic units it charged (the revenue)."""
    metrics = _current
    reason = line["reason"]
    metrics.decision(line["decision"], reason, price.route if price is not None else "")
    if charged and price is not None:
        metrics.charge(price.asset.code, price.route, charged)
    elif reason == LEDGER_UNAVAILABLE:
        metrics.ledger_errors.inc()
    metrics.latency.observe(seconds)


def record_phase(line: Mapping[str, Any], captured: int, seconds: float) -> None:
    """One response phase (server/processing/): capture, release or deny; the revenue of
    a route charged on success is counted here, at the capture, never at its hold."""
    metrics = _current
    route = line.get("route") or ""
    metrics.decision(line["decision"], line["reason"], route)
    if captured:
        metrics.charge(line.get("asset") or "", route, captured)
    elif line["reason"] == LEDGER_UNAVAILABLE:
        metrics.ledger_errors.inc()


def facilitator_not_reached(host: str, status: int | str) -> None:
    _current.facilitator_not_reached.labels(host, str(status)).inc()


def reconcile_repaired(count: int) -> None:
    """`count` lost top-ups credited by a reconciliation pass (worker 0's)."""
    if count:
        _current.reconcile_repairs.inc(count)


def admin_auth_failed(api: str) -> None:
    """A wrong or missing admin credential: `api` is "grpc" or "dashboard"."""
    _current.admin_auth_failures.labels(api).inc()


class _LedgerState(Collector):
    """What /metrics reads from Redis at scrape time: the settlement lag and the memory."""

    def __init__(self, lag: float | None, memory: Memory | None) -> None:
        self.lag, self.memory = lag, memory

    def collect(self) -> Any:
        if self.lag is not None:
            yield GaugeMetricFamily(
                "x402_settlement_lag_seconds",
                "Age of the oldest receipt not yet in a committed settlement batch, as of "
                "the last settle pass (0: all settled then).",
                value=self.lag,
            )
        if self.memory is None:
            return
        yield GaugeMetricFamily(
            "x402_ledger_memory_used_bytes",
            "The ledger's Redis memory in use (INFO used_memory; on a cluster, the primary "
            "nearest its maxmemory).",
            value=self.memory.used,
        )
        if self.memory.maximum:  # absent without maxmemory: used / max has no series then
            yield GaugeMetricFamily(
                "x402_ledger_memory_max_bytes",
                "The ledger's Redis maxmemory (INFO maxmemory); past it, with noeviction, "
                "every paid request answers 503 ledger_unavailable.",
                value=self.memory.maximum,
            )


def _registry() -> CollectorRegistry:
    """Every process's metrics: the multiprocess files merged, or this process's own."""
    if _multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=_multiprocess_dir)  # type: ignore[no-untyped-call]
        return registry
    assert _current.registry is not None
    return _current.registry


def decision_counts() -> dict[tuple[str, str, str], int]:
    """x402_decisions of every worker, read from the registry: (decision, reason, route)
    to its count (the dashboard's "by reason")."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for family in _registry().collect():
        if family.name != "x402_decisions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                counts[(labels["decision"], labels["reason"], labels["route"])] += int(sample.value)
    return dict(counts)


def render(settlement_lag: float | None = None, ledger_memory: Memory | None = None) -> bytes:
    """The text exposition of every process's metrics, plus the ledger's state."""
    page = generate_latest(_registry())
    extra = CollectorRegistry()
    extra.register(_LedgerState(settlement_lag, ledger_memory))
    return page + generate_latest(extra)


@contextlib.contextmanager
def aggregated(workers: int) -> Iterator[None]:
    """For the supervisor's lifetime: with several workers, a fresh multiprocess directory
    (removed at exit, so a restart never counts a previous run's samples twice)."""
    if workers <= 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="x402-metrics-") as directory:
        use_multiprocess(directory)
        yield
