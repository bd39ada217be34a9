"""(1)-(8) on one stack (Redis, one Envoy with a bare listener and the product listener,
the upstream Envoy's own direct_response), then (2h)-(8h) over the HTTP transport, (4w1)
with one worker and (4r)/(4n), the outcome record's cost side by side: the allow-all
baseline (bench/allow_all.py), then the sidecar,
each phase measured with wrk, `x402 load` or bench/paced.py, and the ledger reconciled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import (
    FREE_PATH,
    HELD_PATH,
    HERE,
    HOLD_SECONDS,
    METERED_PATH,
    PAID_PATH,
    PAYERS,
    PRICE_ATOMIC,
    ROUTES,
    UNIT_PRICE_ATOMIC,
    UNITS_USED,
    CpuMeter,
    bytes_per_check,
    check_traffic,
    decision_latencies,
    envoy_stat,
    fund,
    ledger_bytes,
    ledger_totals,
    presign,
    reset_ledger,
    restart,
    run_wrk,
    wait_ports,
    write_bench_files,
)
from sidecar.core.identity import Identity
from sidecar.tools.load import percentiles
from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port, wait_http

# (5): one generator process reached the stack's limit on 2 cores, a second only took CPU
# from the stack (docs/performance.md); the loops in flight are enough to keep it busy.
LOAD_PROCESSES, LOAD_AGENTS = 1, 32
# (4r)/(4n): the outcome record's cost, side by side (bench/before_record.py).
BEFORE_RECORD = "4r paid direct, before the record"
WITH_RECORD = "4n paid direct, with the record"
REPO = HERE.parent


def run_load(
    stack: Stack, seconds: float, concurrency: int, *extra: str, pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """`x402 load` on the paid route; with `pids`, the CPU per cleared loop of each part of
    the stack beside the generator's own (measured by x402 load over its clock)."""
    out = stack.dir / f"load-{time.monotonic_ns()}.json"
    argv = [
        sys.executable,
        "-m",
        "sidecar.tools.cli",
        "load",
        "--url",
        stack.url,
        "--redis",
        stack.redis_url,
        "--route",
        f"GET {PAID_PATH}",
        "--duration",
        f"{seconds}s",
        "--concurrency",
        str(concurrency),
        "--json",
        str(out),
        "--no-progress",
        *extra,
    ]
    meter = CpuMeter(pids) if pids else None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if not out.exists():
        raise SystemExit(f"bench: x402 load failed:\n{done.stdout}\n{done.stderr}")
    summary: dict[str, Any] = json.loads(out.read_text())
    if meter is not None:
        # The stack's processes over the whole run (setup is a few Redis calls); "client" would
        # be the generator's setup and pre-signing too, so its own window figure replaces it.
        cpu = meter.per_request(summary["cleared"])
        del cpu["client"]
        cpu["generator"] = summary["generator_cpu"]["us_per_loop"]
        summary["cpu_us_per_loop"] = cpu
    summary["agents"] = concurrency
    return summary


def load_phase(
    name: str, stack: Stack, pids: dict[str, int], seconds: float, agents: int
) -> dict[str, Any]:
    """One run of phase (5), printed as it ends."""
    figures = run_load(stack, seconds, agents, "--processes", str(LOAD_PROCESSES), pids=pids)
    cpu, gen, loop = figures["cpu_us_per_loop"], figures["generator_cpu"], figures["loop_ms"]
    print(
        f"bench: {name:<30} "
        f"{figures['loops_per_second']:>8.0f} loops/s  loop p50 {loop['p50']:.2f} ms  p99 "
        f"{loop['p99']:.2f} ms  (402 leg p50 {figures['challenge_ms']['p50']:.2f}, paid "
        f"{figures['paid_ms']['p50']:.2f})\n"
        f"bench:   CPU µs/loop: envoy {cpu['envoy']:.0f}, redis {cpu['redis']:.0f}, sidecar "
        f"{cpu['sidecar']:.0f}; generator {cpu['generator']:.0f} ({gen['cores']:.2f} cores, "
        f"{figures['processes']} process{'es' if figures['processes'] > 1 else ''})",
        flush=True,
    )
    return figures


def run_paced(url: str, rate: float, seconds: float, proofs: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.paced", "--url", url, "--rate", str(rate),
            "--seconds", str(seconds), "--proofs", str(proofs)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: bench.paced failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def reconcile(stack: Stack, envoy_allowed: int, in_flight: int) -> dict[str, Any]:
    """No double spend: every charge has exactly one decision line, so paid lines +
    captures = receipts = spent nonces, debits = what those lines say, no balance is below
    zero and no hold is left. Envoy passed on at most that many checks charged on check:
    when wrk stops it drops its connections, and a check already charged then answers a
    client that is gone (at most `in_flight` such checks); a hold cut off that way is never
    captured, and released."""
    paid = cancelled = captured = metered = 0
    for line in stack.processes["sidecar"].log().splitlines():
        if '"authz.decision"' not in line:
            continue
        if '"reason": "paid"' in line:
            paid += 1
            cancelled += '"cancelled": true' in line
        elif '"reason": "captured"' in line:
            captured += 1
            metered += '"route": "metered"' in line
    totals = ledger_totals(stack)
    charged = (paid + captured - metered) * PRICE_ATOMIC + metered * UNITS_USED * UNIT_PRICE_ATOMIC
    exact = (
        totals["debited_atomic"] == charged
        and totals["receipts"] == paid + captured
        and totals["spent_nonces"] == paid + captured
        and totals["lowest_balance"] >= 0
        and totals["held_atomic"] == 0
        and envoy_allowed <= paid <= envoy_allowed + in_flight
    )
    return {
        **totals,
        "paid_decisions": paid,
        "captures": captured,
        "metered_captures": metered,
        "envoy_allowed": envoy_allowed,
        "charged_client_gone": paid - envoy_allowed,
        "cancelled_after_debit": cancelled,
        "price_atomic": PRICE_ATOMIC,
        "exact": exact,
    }


def selection(phases: str) -> set[str] | None:
    """`--phases 2,4`: only those (None: all); 2 and 4 run 2b too, whose rate sizes their
    proofs."""
    only = set(phases.split(",")) if phases else None
    if only is not None and only & {"2", "4"}:
        only.add("2b")
    return only


class LocalRun:
    """(1)-(8), (2h)-(8h) and (4w1) on one stack, into results["phases"]."""

    def __init__(
        self, wrk: str, args: argparse.Namespace, only: set[str] | None, results: dict[str, Any]
    ) -> None:
        self.wrk, self.args, self.only, self.results = wrk, args, only, results
        self.phases: dict[str, Any] = results["phases"]
        settings: dict[str, Any] = {"max_direct_ttl_seconds": 3600, "hold_sweep_seconds": 1}
        if args.replay_per_payer is not None:
            settings["replay_per_payer"] = args.replay_per_payer
        self.stack = Stack(
            ROUTES,
            settings=settings,
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
        )
        self.bare_port = free_port()
        self.free_url = self.stack.url + FREE_PATH
        self.paid_url = self.stack.url + PAID_PATH
        self.wallets = [Identity.generate() for _ in range(PAYERS)]
        self.funding = 0  # each wallet's credit, set with the proofs

    def wanted(self, phase: str) -> bool:
        return self.only is None or phase in self.only

    def run(self) -> None:
        stack = self.stack
        try:
            write_bench_files(stack, self.bare_port)
            stack.start_redis()
            stack.start_envoy()
            self.grpc_phases()
            self.http_phases()
            self.one_worker()
            self.record_cost()
        finally:
            stack.stop()

    def pids(self) -> dict[str, int]:
        names = ("envoy", "redis", "sidecar", "allow_all")
        processes = self.stack.processes
        return {n: processes[n].popen.pid for n in names if n in processes}

    def wrk_phase(self, name: str, url: str, paid: bool = False, prefix: str = "") -> None:
        args, stack = self.args, self.stack
        warm, proofs = str(stack.dir / "warm"), str(stack.dir / "proofs")
        warm_args: tuple[str, ...] = ()
        run_args: tuple[str, ...] = ()
        script = "plain.lua"
        if paid:  # fresh proofs: warm-up and measured run each have their own
            script, warm_args, run_args = "paid.lua", (warm + prefix,), (proofs + prefix,)
        if args.warmup:
            run_wrk(self.wrk, url, args.warmup, args.connections, args.threads, script, warm_args)
        meter = CpuMeter(self.pids())
        asked, memory = check_traffic(stack), ledger_bytes(stack)
        figures = run_wrk(
            self.wrk, url, args.duration, args.connections, args.threads, script, run_args
        )
        figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
        figures["bytes_per_check"] = bytes_per_check(asked, check_traffic(stack))
        figures["peak_rss_mb"] = meter.peak_rss()
        if paid:  # what each paid request left in Redis (spent nonce, receipt, outcome, hold)
            grown = ledger_bytes(stack) - memory
            figures["ledger_bytes_per_request"] = round(grown / max(figures["requests"], 1))
        self.phases[name] = figures
        print(
            f"bench: {name:<30} {figures['ok_rps']:>8.0f} req/s  "
            f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms",
            flush=True,
        )

    def allow_all(self, transport: str) -> Process:
        """The allow-all baseline on the sidecar's ports of this transport."""
        port = self.stack.ports["grpc" if transport == "grpc" else "authz_http"]
        argv = [sys.executable, "-m", "bench.allow_all", "--port", str(port),
                "--workers", str(self.args.workers)]  # fmt: skip
        if transport == "http":
            argv += ["--transport", "http"]
        process = self.stack._spawn("allow_all", argv)
        wait_ports(port, self.args.workers, process)
        return process

    def stop_allow_all(self, process: Process) -> None:
        process.stop()
        del self.stack.processes["allow_all"]

    def presign_all(self) -> None:
        """Unique proofs for (2) and (4), enough for the baseline's speed; the allow-all
        server spends none, so (4) replays the very requests of (2)."""
        args, stack, wallets = self.args, self.stack, self.wallets
        plain = self.phases.get("2b allow-all, no proof header", {})
        budget = plain.get("ok_rps", 4000) * 1.3
        count = int(budget * args.duration) + 500
        warm_count = int(budget * args.warmup) + 500
        paced_count = int(args.rate * args.duration * 1.1) + 100
        # (4), (6), (7) and (8) each spend up to their proofs' worth
        self.funding = 3 * (count + warm_count + paced_count) * PRICE_ATOMIC
        asyncio.run(fund(stack, wallets, self.funding))
        payee = stack.gateway_identity.kid
        threads = range(args.threads)
        presign(warm_count, wallets, payee, [stack.dir / f"warm.{i}" for i in threads])
        presign(count, wallets, payee, [stack.dir / f"proofs.{i}" for i in threads])
        presign(paced_count, wallets, payee, [stack.dir / "paced"])
        for prefix, path in ((".held", HELD_PATH), (".metered", METERED_PATH)):
            presign(
                warm_count, wallets, payee, [stack.dir / f"warm{prefix}.{i}" for i in threads], path
            )
            presign(
                count, wallets, payee, [stack.dir / f"proofs{prefix}.{i}" for i in threads], path
            )

    def challenge_loops(self, prefix: str) -> None:
        """(5): x402 load at the stack's limit, then one agent (latency)."""
        duration = self.args.duration
        for agents, seconds in ((LOAD_AGENTS, duration), (1, max(3.0, duration / 2))):
            name = f"{prefix} challenge loops, {'full speed' if agents > 1 else '1 agent'}"
            self.phases[name] = load_phase(name, self.stack, self.pids(), seconds, agents)

    def paced(self) -> None:
        """(6) paid requests at a constant rate: the sidecar's own check latency, from its
        decision log, and the client's through Envoy."""
        rate = self.args.rate
        log = self.stack.processes["sidecar"].log_path
        offset = log.stat().st_size
        paced = run_paced(self.paid_url, rate, self.args.duration, self.stack.dir / "paced")
        time.sleep(0.5)  # the last decision lines are written after the answers
        paced["sidecar_check_ms"] = percentiles(decision_latencies(log, offset))
        self.phases[f"6 paid at {rate:.0f} req/s"] = paced
        print(
            f"bench: {'6 paid at constant rate':<30} {paced['rate']:>8.0f} req/s  "
            f"sidecar check p99 {paced['sidecar_check_ms']['p99']} ms",
            flush=True,
        )

    def charged_on_success(self, held: str, metered: str) -> None:
        """(7) and (8) (or (7h) and (8h)): charged on success, through the response
        phase (the Lua filter's call, server/envoy/phase_call.py)."""
        stack = self.stack
        if self.wanted(held.partition(" ")[0]):
            self.wrk_phase(held, stack.url + HELD_PATH, paid=True, prefix=".held")
        if self.wanted(metered.partition(" ")[0]):
            self.wrk_phase(metered, stack.url + METERED_PATH, paid=True, prefix=".metered")
        if self.wanted(held.partition(" ")[0]) or self.wanted(metered.partition(" ")[0]):
            time.sleep(HOLD_SECONDS + 2.5)  # holds cut off when wrk hung up expire, swept

    def grpc_phases(self) -> None:
        """(1)-(8) over gRPC."""
        stack, bare_url = self.stack, f"http://{LOOPBACK}:{self.bare_port}{PAID_PATH}"
        if self.wanted("1"):
            self.wrk_phase("1 envoy only", bare_url)
        allow_all = self.allow_all("grpc")
        if self.wanted("2b"):
            self.wrk_phase("2b allow-all, no proof header", self.free_url)
        self.presign_all()
        if self.wanted("2"):
            self.wrk_phase("2 allow-all ext_authz", self.paid_url, paid=True)
        self.stop_allow_all(allow_all)
        stack.start_sidecar()
        if self.wanted("3"):
            self.wrk_phase("3 sidecar free route", self.free_url)
        before = envoy_stat(stack, "http.ingress.ext_authz.ok")
        if self.wanted("4"):
            self.wrk_phase("4 sidecar paid direct", self.paid_url, paid=True)
        if self.wanted("5"):
            self.challenge_loops("5")
        if self.wanted("6"):
            self.paced()
        time.sleep(0.5)
        envoy_allowed = envoy_stat(stack, "http.ingress.ext_authz.ok") - before
        self.charged_on_success("7 gRPC paid on_success", "8 gRPC paid metered")
        # wrk's paid runs (warm-up and measured) each leave up to `connections` in flight.
        self.results["ledger"] = reconcile(stack, envoy_allowed, 2 * self.args.connections)

    def http_phases(self) -> None:
        """(2h)-(8h): the same over the HTTP transport (server/authz/http_transport.py). The ledger
        starts afresh, so the same pre-signed proofs pay once more."""
        if not any(self.wanted(phase) for phase in ("2h", "3h", "4h", "5h", "7h", "8h")):
            return
        stack = self.stack
        restart(stack, self.bare_port, "http", self.args.workers)
        allow_all = self.allow_all("http")
        if self.wanted("2h"):
            self.wrk_phase("2h HTTP allow-all, no proof header", self.free_url)
        self.stop_allow_all(allow_all)
        reset_ledger(stack, self.wallets, self.funding)
        stack.start_sidecar()
        if self.wanted("3h"):
            self.wrk_phase("3h HTTP sidecar free route", self.free_url)
        before = envoy_stat(stack, "http.ingress.ext_authz.ok")
        if self.wanted("4h"):
            self.wrk_phase("4h HTTP sidecar paid direct", self.paid_url, paid=True)
        if self.wanted("5h"):
            self.challenge_loops("5h HTTP")
        time.sleep(0.5)
        envoy_allowed = envoy_stat(stack, "http.ingress.ext_authz.ok") - before
        self.charged_on_success("7h HTTP paid on_success", "8h HTTP paid metered")
        self.results["ledger_http"] = reconcile(stack, envoy_allowed, 2 * self.args.connections)

    def one_worker(self) -> None:
        """(4w1): what one worker does alone, over each transport; (4) and (4h) had
        `--workers` (one per core)."""
        for transport, name in (("grpc", "4w1 paid direct, 1 worker"),
                                ("http", "4w1h HTTP paid direct, 1 worker")):  # fmt: skip
            if self.wanted(name.partition(" ")[0]) and self.args.workers > 1:
                restart(self.stack, self.bare_port, transport, 1)
                reset_ledger(self.stack, self.wallets, self.funding)
                self.stack.start_sidecar()
                self.wrk_phase(name, self.paid_url, paid=True)

    def record_cost(self) -> None:
        """(4r) and (4n): paid direct over gRPC with the debit script of before the outcome
        record (bench/before_record.py) and with today's, each on a fresh ledger, in the
        order 4r 4n 4n 4r (a drift in a shared machine's load hurts both alike), the better
        run of each kept: the record's cost side by side (docs/protocol.md §13)."""
        stack = self.stack
        for name in (BEFORE_RECORD, WITH_RECORD, WITH_RECORD, BEFORE_RECORD):
            if not self.wanted(name.partition(" ")[0]):
                continue
            restart(stack, self.bare_port, "grpc", self.args.workers)
            reset_ledger(stack, self.wallets, self.funding)
            if name == WITH_RECORD:
                stack.start_sidecar()
            else:
                argv = [sys.executable, "-m", "bench.before_record"]
                config = ["serve", "--config", str(stack.config_path)]
                env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
                process = stack._spawn("sidecar", [*argv, *config], env=env)
                wait_http(f"{stack.sideport_url}/readyz", process=process)
            self.wrk_phase(f"{name} (run)", self.paid_url, paid=True)
            run, best = self.phases.pop(f"{name} (run)"), self.phases.get(name)
            if best is None or run["ok_rps"] > best["ok_rps"]:
                self.phases[name] = run
