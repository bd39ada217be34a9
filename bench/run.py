"""`make bench`: the sidecar against its baselines, through real Envoy, in one run.

Starts Redis, one Envoy (a bare listener without ext_authz, and the product listener; the
upstream is Envoy's own direct_response) and, in turn, the allow-all baseline and the
sidecar, both with the same worker model. Then:

  (1) Envoy only                      wrk, bare listener
  (2) Envoy + allow-all ext_authz     wrk, the floor of any Python ext_authz server
  (3) sidecar, free route             wrk
  (4) sidecar, paid direct proofs     wrk, one unique pre-signed proof per request
  (5) challenge loops                 x402 load: full speed, then 1 agent (latency)
  (6) paid at a fixed 500 req/s       x402 load --direct --rate 500; the sidecar's own
                                      check latency from its decision log
  (7) paid, charge: on_success        wrk, direct proofs; a hold at the check, captured by
                                      the ext_proc response phase
  (8) paid, metered                   wrk, direct proofs; the response reports 37 of 100
                                      units (x402-usage), 37 are captured

Then a second stack whose USDF is also offered as USDC (`exact`) on anvil with Circle's
FiatTokenV2_2, settled through `x402 facilitator serve`, beside the official x402 stack
(bench/official.py) on the same chain and facilitator, all at 16 connections:

  (9)  channel vouchers, 16 lanes     wrk -t16 -c16, a channel per lane; and direct proofs
                                      in the same shape (bench/channels.py)
  (10) sidecar paid direct, c16       wrk -t1 -c16, as (4)
  (11) sidecar exact on anvil, c16    wrk -t1 -c16, pre-signed EIP-3009 authorizations,
                                      each verified and settled on chain
  (12) official x402 stack, c16       the same payments to the official FastAPI middleware

It prints a table and the ratios (results["ratios"], named after both sides), checks the
ledger (debits = allowed paid requests x price, no negative balance) and the chain (USDC
settled = 200s + requests wrk hung up on) and writes bench/results.json. On a 2-core
machine it takes about 4 minutes (`--no-onchain`: 2, without (9)-(12)).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml
from eth_account import Account

from bench import official
from sidecar.core import protocol
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.tools.chain import Chain, install_chain_tools
from sidecar.tools.load import percentiles
from sidecar.tools.onchain import Facilitator, exact_settings, operator
from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port, wait_http

HERE = Path(__file__).resolve().parent
WRK_SCRIPTS = HERE / "wrk"
PAID_PATH, FREE_PATH = "/api/v1/bench/paid", "/api/v1/bench/free"
HELD_PATH, METERED_PATH = "/api/v1/bench/held", "/api/v1/bench/metered"
PRICE, PRICE_ATOMIC = "0.001", 1000
UNITS_USED, UNIT_PRICE_ATOMIC = 37, 10  # the metered route: 37 of 100 units of 0.00001
HOLD_SECONDS = 5  # holds cut off when wrk hangs up expire before the ledger is checked
ROUTES: dict[str, dict[str, Any]] = {
    "paid": {"method": "GET", "path": PAID_PATH, "price": PRICE},
    "held": {
        "method": "GET",
        "path": HELD_PATH,
        "price": PRICE,
        "charge": "on_success",
        "hold_seconds": HOLD_SECONDS,
    },
    "metered": {
        "method": "GET",
        "path": METERED_PATH,
        "unit": "row",
        "unit_price": "0.00001",
        "max_units": 100,
        "hold_seconds": HOLD_SECONDS,
    },
}
PROOF_TTL = 3000  # pre-signed proofs must outlive the run (the sidecar allows 3600 here)
PAYERS = 64  # wallets behind the pre-signed proofs


# -- tools ------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk from PATH, else from Debian's package (the bench must run on a fresh machine)."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        sys.exit("bench: wrk is missing; install it (Debian/Ubuntu: apt-get install -y wrk)")
    print("bench: installing wrk (apt-get install -y wrk)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk") or sys.exit("bench: wrk did not install")


def run_wrk(
    wrk: str,
    url: str,
    seconds: float,
    connections: int,
    threads: int,
    script: str = "plain.lua",
    args: tuple[str, ...] = (),
    timeout: int = 5,
) -> dict[str, Any]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        f"{timeout}s",
        "-s",
        script,
        url,
        "--",
        *args,
    ]
    done = subprocess.run(
        argv,
        cwd=WRK_SCRIPTS,
        capture_output=True,
        text=True,
        timeout=seconds + timeout + 60,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            figures: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
            seconds_run = figures["duration_us"] / 1e6
            errors = sum(
                figures[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            )
            figures.update(
                ok=figures["requests"] - figures["non_2xx"],
                rps=round(figures["requests"] / seconds_run, 1),
                ok_rps=round((figures["requests"] - figures["non_2xx"]) / seconds_run, 1),
                p50_ms=figures["p50_us"] / 1000,
                p99_ms=figures["p99_us"] / 1000,
                socket_errors=errors,
            )
            return figures
    raise SystemExit(f"bench: wrk failed:\n{done.stdout}\n{done.stderr}")


# (5): one generator process reached the stack's limit on 2 cores, a second only took CPU
# from the stack (docs/performance.md); the loops in flight are enough to keep it busy.
LOAD_PROCESSES, LOAD_AGENTS = 1, 32


def run_load(
    stack: Stack, seconds: float, concurrency: int, *extra: str, parts: dict[str, int] | None = None
) -> dict[str, Any]:
    """`x402 load` on the paid route; with `parts`, the CPU per cleared loop of each part of
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
    meter = CpuMeter(parts) if parts else None
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if not out.exists():
        raise SystemExit(f"bench: x402 load failed:\n{done.stdout}\n{done.stderr}")
    summary: dict[str, Any] = json.loads(out.read_text())
    if meter is not None:
        # The stack's parts over the whole run (setup is a few Redis calls); "client" would
        # be the generator's setup and pre-signing too, so its own window figure replaces it.
        cpu = meter.per_request(summary["cleared"])
        del cpu["client"]
        cpu["generator"] = summary["generator_cpu"]["us_per_loop"]
        summary["cpu_us_per_loop"] = cpu
    summary["agents"] = concurrency
    return summary


def load_phase(
    name: str, stack: Stack, parts: dict[str, int], seconds: float, agents: int
) -> dict[str, Any]:
    """One run of phase (5), printed as it ends."""
    figures = run_load(stack, seconds, agents, "--processes", str(LOAD_PROCESSES), parts=parts)
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


# -- the stack --------------------------------------------------------------------------


def write_bench_files(stack: Stack, bare_port: int | None = None) -> None:
    """The stack's files, its Envoy config made the bench's (bench_envoy)."""
    stack.write_files()
    envoy_file = stack.dir / "envoy.yaml"
    config = bench_envoy(yaml.safe_load(envoy_file.read_text()), bare_port or free_port())
    envoy_file.write_text(yaml.safe_dump(config, sort_keys=False))


def bench_envoy(config: dict[str, Any], bare_port: int) -> dict[str, Any]:
    """The product's Envoy config, answering from Envoy itself instead of an upstream (so
    the upstream costs nothing), plus a bare listener without ext_authz for (1)."""
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route.get("route", {}).get("cluster") == "service":
            del route["route"]
            route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
        if route.get("name") == "metered":  # the service reports its usage
            route["response_headers_to_add"] = [
                {"header": {"key": "x402-usage", "value": str(UNITS_USED)}}
            ]
    bare = copy.deepcopy(listener)
    bare["name"] = "bare"
    bare["address"]["socket_address"]["port_value"] = bare_port
    bare_hcm = bare["filter_chains"][0]["filters"][0]["typed_config"]
    bare_hcm["stat_prefix"] = "bare"
    bare_hcm["http_filters"] = [
        f for f in bare_hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"
    ]
    for route in bare_hcm["route_config"]["virtual_hosts"][0]["routes"]:
        route.pop("typed_per_filter_config", None)
    config["static_resources"]["listeners"].append(bare)
    return config


def envoy_stat(stack: Stack, name: str) -> int:
    return stack.envoy_counter(name)


def check_traffic(stack: Stack) -> tuple[int, int]:
    """Bytes Envoy has sent to the check cluster of the stack's transport, and requests."""
    cluster = "x402_authz_http" if stack.transport == "http" else "x402_authz"
    return (
        envoy_stat(stack, f"cluster.{cluster}.upstream_cx_tx_bytes_total"),
        envoy_stat(stack, f"cluster.{cluster}.upstream_rq_total"),
    )


def bytes_per_check(before: tuple[int, int], after: tuple[int, int]) -> int | None:
    """What one check cost on the wire to the sidecar (None: no check was asked)."""
    sent, asked = after[0] - before[0], after[1] - before[1]
    return round(sent / asked) if asked > 0 else None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live descendants."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, ValueError):
        pass
    return total


class CpuMeter:
    """CPU µs per request of each part of the stack (and of wrk) during one phase."""

    def __init__(self, parts: dict[str, int]) -> None:
        self.parts = parts
        self.before = {name: cpu_seconds(pid) for name, pid in parts.items()}
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def per_request(self, requests: int) -> dict[str, float]:
        used = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.parts.items()}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["client"] = (after.ru_utime + after.ru_stime) - (
            self.children.ru_utime + self.children.ru_stime
        )
        return {name: round(seconds * 1e6 / max(requests, 1), 1) for name, seconds in used.items()}


def restart(stack: Stack, bare_port: int, transport: str, workers: int) -> None:
    """Envoy (and no sidecar yet) again, rendered for this transport and worker count; the
    sidecar's log so far is kept aside, so each reconcile reads its own run's lines."""
    for name in ("envoy", "sidecar"):
        process = stack.processes.pop(name, None)
        if process is not None:
            process.stop()
    log = stack.dir / "sidecar.log"
    if log.exists():
        log.rename(stack.dir / f"sidecar-{time.monotonic_ns()}.log")
    stack.transport, stack.workers = transport, workers
    for secret in ("signing.key", "invoice.secret"):  # written anew (same gateway key)
        (stack.dir / secret).unlink()
    write_bench_files(stack, bare_port)
    stack.start_envoy()


def afresh(stack: Stack, wallets: list[Identity], atomic: int) -> None:
    """An empty ledger with the wallets funded again: pre-signed proofs pay once more."""
    client = redis.Redis.from_url(stack.redis_url)
    client.flushall()
    client.close()
    asyncio.run(fund(stack, wallets, atomic))


def wait_ports(first: int, count: int, process: Process) -> None:
    """Until every worker of the allow-all server accepts connections."""
    deadline = time.monotonic() + 20
    for port in range(first, first + count):
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.popen.poll() is not None:
                    raise SystemExit(
                        f"bench: allow-all did not start; see {process.log_path}"
                    ) from None
                time.sleep(0.05)


def _sign_batch(job: tuple[list[str], int, str, int, str]) -> list[str]:
    seeds, count, payee, expires_at, path = job
    wallets = [Identity.from_seed_text(seed) for seed in seeds]
    headers = []
    for i in range(count):
        terms = {
            "version": protocol.VERSION,
            "scheme": protocol.SCHEME,
            "nonce": protocol.new_nonce(),
            "resource": f"GET {path}",
            "asset": "USDF",
            "amount": PRICE,  # every bench route holds or charges 0.001
            "payee": payee,
            "expires_at": expires_at,
        }
        headers.append(
            protocol.encode_header(protocol.sign_proof(terms, wallets[i % len(wallets)]))
        )
    return headers


def presign(
    count: int, wallets: list[Identity], payee: str, files: list[Path], path: str = PAID_PATH
) -> None:
    """`count` direct proofs for `path`, one per request, spread over `files` (one per wrk
    thread)."""
    seeds = [w.seed_text for w in wallets]
    expires_at = int(time.time()) + PROOF_TTL
    jobs = os.cpu_count() or 1
    with multiprocessing.Pool(jobs) as pool:
        job = (seeds, count // jobs + 1, payee, expires_at, path)
        batches = pool.map(_sign_batch, [job] * jobs)
    proofs = [p for batch in batches for p in batch][:count]
    for i, file in enumerate(files):
        file.write_text("\n".join(proofs[i :: len(files)]) + "\n")


async def fund(stack: Stack, wallets: list[Identity], atomic: int) -> None:
    ledger = Ledger.from_url(stack.redis_url)
    for wallet in wallets:
        await ledger.register(wallet.public_key)
        await ledger.credit(wallet.public_key, "USDF", atomic, f"bench-{wallet.kid}")
    await ledger.close()


def ledger_totals(stack: Stack) -> dict[str, int]:
    """Over every account: debited total, lowest balance, receipts and spent nonces."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    debited, lowest, receipts, accounts, held = 0, 0, 0, 0, 0
    for key in client.scan_iter("x402:{*}:account", count=1000):
        fields = client.hgetall(key)
        accounts += 1
        debited += int(fields.get("debited:USDF", 0))
        held += int(fields.get("held:USDF", 0))
        lowest = min(lowest, int(fields.get("balance:USDF", 0)))
        receipts += int(client.xlen(key.removesuffix(":account") + ":receipts"))
    nonces = sum(1 for _ in client.scan_iter("x402:{*}:nonce:*", count=10_000))
    client.close()
    return {
        "accounts": accounts,
        "debited_atomic": debited,
        "held_atomic": held,
        "lowest_balance": lowest,
        "receipts": receipts,
        "spent_nonces": nonces,
    }


def decision_latencies(log: Path, offset: int) -> list[float]:
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    latencies = []
    for line in lines:
        if '"authz.decision"' in line and '"paid"' in line:
            latencies.append(float(json.loads(line)["latency_ms"]))
    return latencies


# -- the run ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="x402 sidecar benchmark")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk phase")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=500.0, help="paid req/s of phase 6")
    parser.add_argument("--out", type=Path, help="default: bench/results.json, on a full run")
    parser.add_argument("--phases", default="", help="only these, e.g. 2,4 (2 and 4 run 2b)")
    parser.add_argument(
        "--official-duration", type=float, default=10.0, help="seconds of (11) and (12)"
    )
    parser.add_argument(
        "--no-onchain", action="store_true", help="skip (9)-(12): vouchers, exact, official"
    )
    args = parser.parse_args()
    only = set(args.phases.split(",")) if args.phases else None
    if only is not None and only & {"2", "4"}:
        only.add("2b")  # its rate sizes the proofs of (2) and (4)

    def wanted(phase: str) -> bool:
        return only is None or phase in only

    out = args.out or (HERE / "results.json" if only is None else None)
    wrk = ensure_wrk()
    started = time.monotonic()
    results: dict[str, Any] = {"phases": {}}
    phases = results["phases"]

    stack = Stack(
        ROUTES,
        settings={"max_direct_ttl_seconds": 3600, "hold_sweep_seconds": 1},
        workers=args.workers,
        envoy_concurrency=args.envoy_concurrency,
    )
    bare_port = free_port()
    try:
        write_bench_files(stack, bare_port)
        stack.start_redis()
        stack.start_envoy()
        bare_url = f"http://{LOOPBACK}:{bare_port}{PAID_PATH}"
        free_url, paid_url = stack.url + FREE_PATH, stack.url + PAID_PATH
        warm, proofs = str(stack.dir / "warm"), str(stack.dir / "proofs")

        def parts() -> dict[str, int]:
            names = ("envoy", "redis", "sidecar", "allow_all")
            return {n: stack.processes[n].popen.pid for n in names if n in stack.processes}

        def wrk_phase(name: str, url: str, paid: bool = False, prefix: str = "") -> dict[str, Any]:
            warm_args: tuple[str, ...] = ()
            run_args: tuple[str, ...] = ()
            script = "plain.lua"
            if paid:  # fresh proofs: warm-up and measured run each have their own
                script, warm_args, run_args = "paid.lua", (warm + prefix,), (proofs + prefix,)
            if args.warmup:
                run_wrk(wrk, url, args.warmup, args.connections, args.threads, script, warm_args)
            meter = CpuMeter(parts())
            asked = check_traffic(stack)
            figures = run_wrk(
                wrk, url, args.duration, args.connections, args.threads, script, run_args
            )
            figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
            figures["bytes_per_check"] = bytes_per_check(asked, check_traffic(stack))
            phases[name] = figures
            print(
                f"bench: {name:<30} {figures['ok_rps']:>8.0f} req/s  "
                f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms",
                flush=True,
            )
            return figures

        if wanted("1"):
            wrk_phase("1 envoy only", bare_url)
        allow_all = stack._spawn(
            "allow_all",
            [sys.executable, "-m", "bench.allow_all", "--port", str(stack.ports["grpc"]),
             "--workers", str(args.workers)],
        )  # fmt: skip
        wait_ports(stack.ports["grpc"], args.workers, allow_all)
        plain = wrk_phase("2b allow-all, no proof header", free_url) if wanted("2b") else {}

        # Unique proofs for (2) and (4), enough for the baseline's speed; the allow-all
        # server spends none, so (4) replays the very requests of (2).
        wallets = [Identity.generate() for _ in range(PAYERS)]
        budget = plain.get("ok_rps", 4000) * 1.3
        count = int(budget * args.duration) + 500
        warm_count = int(budget * args.warmup) + 500
        paced_count = int(args.rate * args.duration * 1.1) + 100
        # (4), (6), (7) and (8) each spend up to their proofs' worth
        asyncio.run(fund(stack, wallets, 3 * (count + warm_count + paced_count) * PRICE_ATOMIC))
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

        if wanted("2"):
            wrk_phase("2 allow-all ext_authz", paid_url, paid=True)
        allow_all.stop()
        del stack.processes["allow_all"]

        stack.start_sidecar()
        if wanted("3"):
            wrk_phase("3 sidecar free route", free_url)
        before = envoy_stat(stack, "http.ingress.ext_authz.ok")
        if wanted("4"):
            wrk_phase("4 sidecar paid direct", paid_url, paid=True)

        def challenge_loops(prefix: str) -> None:
            """(5): x402 load at the stack's limit, then one agent (latency)."""
            for agents, seconds in ((LOAD_AGENTS, args.duration),
                                    (1, max(3.0, args.duration / 2))):  # fmt: skip
                name = f"{prefix} challenge loops, {'full speed' if agents > 1 else '1 agent'}"
                phases[name] = load_phase(name, stack, parts(), seconds, agents)

        if wanted("5"):
            challenge_loops("5")

        # (6) paid requests at a constant rate: the sidecar's own check latency, from its
        # decision log, and the client's through Envoy.
        if wanted("6"):
            log = stack.processes["sidecar"].log_path
            offset = log.stat().st_size
            paced = run_paced(paid_url, args.rate, args.duration, stack.dir / "paced")
            time.sleep(0.5)  # the last decision lines are written after the answers
            paced["sidecar_check_ms"] = percentiles(decision_latencies(log, offset))
            phases[f"6 paid at {args.rate:.0f} req/s"] = paced
            print(
                f"bench: {'6 paid at constant rate':<30} {paced['rate']:>8.0f} req/s  "
                f"sidecar check p99 {paced['sidecar_check_ms']['p99']} ms",
                flush=True,
            )

        time.sleep(0.5)
        envoy_allowed = envoy_stat(stack, "http.ingress.ext_authz.ok") - before

        # (7) and (8): charged on success, through the ext_proc response phase.
        if wanted("7"):
            wrk_phase("7 paid on_success", stack.url + HELD_PATH, paid=True, prefix=".held")
        if wanted("8"):
            wrk_phase("8 paid metered", stack.url + METERED_PATH, paid=True, prefix=".metered")
        if wanted("7") or wanted("8"):  # holds cut off when wrk hung up expire, then swept
            time.sleep(HOLD_SECONDS + 2.5)
        # wrk's paid runs (warm-up and measured) each leave up to `connections` in flight.
        results["ledger"] = reconcile(stack, envoy_allowed, 2 * args.connections)

        # (2h)-(8h): the same over the HTTP transport (server/authz/http_transport.py). The ledger
        # starts afresh, so the same pre-signed proofs pay once more.
        funding = 3 * (count + warm_count + paced_count) * PRICE_ATOMIC
        if any(wanted(phase) for phase in ("2h", "3h", "4h", "5h", "7h", "8h")):
            restart(stack, bare_port, "http", args.workers)
            allow_all = stack._spawn(
                "allow_all",
                [sys.executable, "-m", "bench.allow_all", "--port",
                 str(stack.ports["authz_http"]), "--workers", str(args.workers),
                 "--transport", "http"],
            )  # fmt: skip
            wait_ports(stack.ports["authz_http"], args.workers, allow_all)
            if wanted("2h"):
                wrk_phase("2h HTTP allow-all, no proof header", free_url)
            allow_all.stop()
            del stack.processes["allow_all"]
            afresh(stack, wallets, funding)
            stack.start_sidecar()
            if wanted("3h"):
                wrk_phase("3h HTTP sidecar free route", free_url)
            before = envoy_stat(stack, "http.ingress.ext_authz.ok")
            if wanted("4h"):
                wrk_phase("4h HTTP sidecar paid direct", paid_url, paid=True)
            if wanted("5h"):
                challenge_loops("5h HTTP")
            time.sleep(0.5)
            envoy_allowed = envoy_stat(stack, "http.ingress.ext_authz.ok") - before
            if wanted("7h"):
                wrk_phase("7h HTTP paid on_success", stack.url + HELD_PATH, paid=True,
                          prefix=".held")  # fmt: skip
            if wanted("8h"):
                wrk_phase("8h HTTP paid metered", stack.url + METERED_PATH, paid=True,
                          prefix=".metered")  # fmt: skip
            if wanted("7h") or wanted("8h"):
                time.sleep(HOLD_SECONDS + 2.5)
            results["ledger_http"] = reconcile(stack, envoy_allowed, 2 * args.connections)

        # (4w1): what one worker does alone, over each transport; (4) and (4h) had
        # `--workers` (one per core).
        for transport, name in (("grpc", "4w1 paid direct, 1 worker"),
                                ("http", "4w1h HTTP paid direct, 1 worker")):  # fmt: skip
            if wanted(name.partition(" ")[0]) and args.workers > 1:
                restart(stack, bare_port, transport, 1)
                afresh(stack, wallets, funding)
                stack.start_sidecar()
                wrk_phase(name, paid_url, paid=True)
    finally:
        stack.stop()
    if not args.no_onchain and (only is None or only & {"9", "10", "11", "12"}):
        onchain_phases(wrk, args, results)

    results["machine"] = {
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "workers": args.workers,
        "envoy_concurrency": args.envoy_concurrency,
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration:g}s",
    }
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results, args.rate)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"bench: wrote {out} ({results['seconds']} s)")


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


def report(results: dict[str, Any], rate: float) -> None:
    phases = results["phases"]
    results["ratios"] = named_ratios(phases)  # of the phases that ran (--phases)
    print()
    print(f"{'phase':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, figures in phases.items():
        if "ok_rps" in figures:
            row = (figures["ok_rps"], figures["p50_ms"], figures["p99_ms"])
        elif "loop_ms" in figures:
            row = (figures["loops_per_second"], figures["loop_ms"]["p50"],
                   figures["loop_ms"]["p99"])  # fmt: skip
        else:
            row = (figures["rate"], figures["latency_ms"]["p50"], figures["latency_ms"]["p99"])
        print(f"{name:<34}{row[0]:>9.0f}{row[1]:>9.2f}{row[2]:>9.2f}")
    print()
    for name, ratio in results["ratios"].items():
        print(f"{name:<48}{ratio:>7.3f}")
    if f"6 paid at {rate:.0f} req/s" in phases:
        check = phases[f"6 paid at {rate:.0f} req/s"]["sidecar_check_ms"]
        print(f"{f'sidecar check at {rate:.0f} paid req/s':<48}p50 {check['p50']} ms, "
              f"p99 {check['p99']} ms")  # fmt: skip
    if "5 challenge loops, 1 agent" in phases:
        print(f"{'challenge loop, 1 agent':<48}p50 "
              f"{phases['5 challenge loops, 1 agent']['loop_ms']['p50']} ms")  # fmt: skip
    onchain_report(results)
    targets(results)
    for key in ("ledger", "ledger_http"):
        if key in results:
            print_ledger(key, results[key])


def print_ledger(key: str, ledger: dict[str, Any]) -> None:
    print(
        f"{key}: {ledger['paid_decisions']} paid decisions x {ledger['price_atomic']} = "
        f"{ledger['paid_decisions'] * ledger['price_atomic']}, + {ledger['captures']} "
        f"captures ({ledger['metered_captures']} metered), debited "
        f"{ledger['debited_atomic']}; receipts {ledger['receipts']}, spent nonces "
        f"{ledger['spent_nonces']}, lowest balance {ledger['lowest_balance']}; Envoy passed "
        f"{ledger['envoy_allowed']} on ({ledger['charged_client_gone']} charged as wrk hung "
        f"up): {'exact, no double spend' if ledger['exact'] else 'MISMATCH'}"
    )


# -- (9)-(12): channel vouchers, `exact` on anvil and the official x402 stack ----------

LANES = 16  # the concurrency at which the sidecar is compared with the official stack
EXACT_TIMEOUT = 900  # seconds pre-signed EIP-3009 authorizations stay valid
PAYER_USDC = 10**12  # atomic USDC minted to each EVM payer: never the limit
ONCHAIN_TIMEOUT = 30  # wrk's per-request timeout (s) where each request settles on chain
VOUCHERS, DIRECT_LANES = "9 channel vouchers, 16 lanes", "9 paid direct, 16 lanes"
PAID_C16, EXACT_C16 = "10 sidecar paid direct, c16", "11 sidecar exact on anvil, c16"
OFFICIAL_C16 = "12 official x402 stack, c16"
PAID_C16_HTTP = "10h HTTP sidecar paid direct, c16"


def show(name: str, figures: dict[str, Any]) -> None:
    print(
        f"bench: {name:<30} {figures['ok_rps']:>8.0f} req/s  "
        f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms",
        flush=True,
    )


def chain_tools() -> None:
    """anvil and Circle's USDC where the tests find them (the Makefile's ANVIL etc., the
    checkout's .tools), else installed once into the per-user cache, as `x402 demo` does."""
    try:
        install_chain_tools(lambda what: print(f"bench: installing {what}", flush=True))
    except X402Error as error:
        raise SystemExit(f"bench: the chain's tools are missing: {error}") from None


def sign_exact(required_header: str, chain: Chain, keys: list[str], count: int) -> list[str]:
    """`count` PAYMENT-SIGNATURE values for a 402's `exact` offer, signed by the official
    x402 client (each a fresh EIP-3009 nonce), spread over the payers."""
    required = official.decode_required(required_header)
    jobs = official.sign_jobs(required, chain.network, chain.token, keys, PAYER_USDC, count)
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        batches = pool.map(official.sign_batch, jobs)
    # Interleaved, so that consecutive requests come from different payers.
    return [h for row in zip(*batches, strict=True) for h in row][:count]


def onchain_phase(
    wrk: str, chain: Chain, url: str, keys: list[str], seconds: float, warmup: float,
    lanes: int, workdir: Path, parts: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """wrk -t1 -c`lanes` with one pre-signed `exact` payment per request against `url`; the
    operator's USDC shows what settled on chain. The rate is first measured in the warm-up,
    so that the run has enough payments but not many more (signing costs the bench time)."""
    challenge = httpx.get(url, timeout=30)
    if challenge.status_code != 402 or "payment-required" not in challenge.headers:
        raise SystemExit(f"bench: {url} did not answer 402: {challenge.status_code}")
    required = challenge.headers["payment-required"]
    payee = operator(chain).address
    before = chain.balance_of(payee)
    warm_count = lanes * 8
    warm = workdir / f"exact-warm-{time.monotonic_ns()}"
    warm.with_suffix(".0").write_text("\n".join(sign_exact(required, chain, keys, warm_count)))
    args = (str(warm), "PAYMENT-SIGNATURE")
    # A settle on chain takes seconds under load: wrk must not give up on it at 5 s.
    warmed = run_wrk(wrk, url, warmup, lanes, 1, "paid.lua", args, ONCHAIN_TIMEOUT)
    # Few warm-up requests finish when each takes seconds: Little's law bounds the rate too.
    latency = warmed["p50_ms"] / 1000 if warmed["requests"] else warmup  # none done: ≥ that
    rate = max(warmed["ok_rps"], lanes / max(latency, 0.001))
    if warmed["exhausted"]:
        rate = max(rate, 3 * warm_count / warmup)
    count = int(rate * 1.6 * seconds) + 4 * lanes
    run = workdir / f"exact-run-{time.monotonic_ns()}"
    run.with_suffix(".0").write_text("\n".join(sign_exact(required, chain, keys, count)))
    args = (str(run), "PAYMENT-SIGNATURE")
    meter = CpuMeter(parts)
    figures = run_wrk(wrk, url, seconds, lanes, 1, "paid.lua", args, ONCHAIN_TIMEOUT)
    figures["cpu_us_per_request"] = meter.per_request(figures["ok"])
    time.sleep(2)  # settles still in flight when wrk hung up
    settled = (chain.balance_of(payee) - before) // PRICE_ATOMIC
    answered = warmed["ok"] + figures["ok"]
    # Every 200 was settled on chain; a payment settled without a 200 is one wrk hung up on
    # (at most the requests in flight at the end of the warm-up and of the run).
    figures["chain"] = {
        "settled_transfers": settled,
        "answered_200": answered,
        "settled_client_gone": settled - answered,
        "exact": 0 <= settled - answered <= 2 * lanes + figures["socket_errors"],
    }
    return figures


def onchain_phases(wrk: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """(9)-(12) on a second stack whose USDF is also offered as USDC on anvil, `exact`,
    settled through `x402 facilitator serve` (the official x402Facilitator), beside the
    official x402 stack (bench/official.py) on the same chain and facilitator:

      (9)  wrk -t16 -c16: a channel voucher per request (one channel per lane, vouchers in
           order), and direct proofs in the same shape (bench/channels.py)
      (10) wrk -t1 -c16: paid direct proofs, as (4) at the official stack's concurrency
      (11) wrk -t1 -c16: x402 `exact` through Envoy and the sidecar, verified and settled
           on chain per request
      (12) wrk -t1 -c16: the official FastAPI middleware + facilitator + chain
    """
    from bench import channels  # imported here: bench.channels imports this module

    chain_tools()
    phases, lanes = results["phases"], LANES
    keys = [Account.create().key.hex() for _ in range(lanes)]  # one EVM payer per connection
    mint = {Account.from_key(key).address: PAYER_USDC for key in keys}
    expect = phases["4 sidecar paid direct"]["ok_rps"] * 1.5  # to size the pre-signing
    with tempfile.TemporaryDirectory(prefix="x402-bench-") as tmp, Chain(mint=mint) as chain:
        workdir = Path(tmp)
        facilitator = Facilitator(chain, workdir)  # its URL now, started below
        settings = exact_settings(chain, facilitator, exact_max_timeout_seconds=EXACT_TIMEOUT)
        stack = Stack(
            ROUTES,
            settings={"max_direct_ttl_seconds": 3600, **settings},
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
        )
        official_port = free_port()
        argv = [sys.executable, "-m", "bench.official", "--facilitator", facilitator.url,
                "--network", chain.network, "--asset", chain.token,
                "--asset-name", chain.token_name, "--asset-version", chain.token_version,
                "--pay-to", operator(chain).address, "--amount", str(PRICE_ATOMIC),
                "--max-timeout-seconds", str(EXACT_TIMEOUT), "--port", str(official_port),
                "--workers", str(args.workers)]  # fmt: skip
        server: Process | None = None
        try:
            facilitator.start()
            # The official server boots (imports) while the sidecar's stack starts.
            server = Process("official", argv, workdir / "official.log").start()
            write_bench_files(stack)
            stack.start_redis()
            stack.start_envoy()
            stack.start_sidecar()
            official_url = f"http://{LOOPBACK}:{official_port}{official.PATH}"
            wait_http(f"http://{LOOPBACK}:{official_port}/health", timeout=120, process=server)
            if args.warmup:
                run_wrk(wrk, stack.url + FREE_PATH, args.warmup, lanes, lanes)

            # (9) vouchers against direct proofs, both one connection per wrk thread.
            per_lane = int(expect * args.duration / lanes) + 200
            for name, run in ((DIRECT_LANES, channels.direct_phase),
                              (VOUCHERS, channels.channel_phase)):  # fmt: skip
                phases[name] = run(wrk, stack, lanes, args.duration, per_lane)
                show(name, phases[name])

            # (10) paid direct at the official stack's concurrency, as (4) otherwise is.
            wallets = [Identity.generate() for _ in range(PAYERS)]
            url = stack.url + PAID_PATH

            def paid_c16(name: str, files: str) -> None:
                count = int(expect * args.duration) + 500
                warm_count = int(expect * args.warmup) + 500
                asyncio.run(fund(stack, wallets, (count + warm_count) * PRICE_ATOMIC))
                payee = stack.gateway_identity.kid
                presign(warm_count, wallets, payee, [stack.dir / f"warm{files}.0"])
                presign(count, wallets, payee, [stack.dir / f"proofs{files}.0"])
                if args.warmup:
                    run_wrk(wrk, url, args.warmup, lanes, 1, "paid.lua",
                            (str(stack.dir / f"warm{files}"),))  # fmt: skip
                meter = CpuMeter({n: p.popen.pid for n, p in stack.processes.items()})
                figures = run_wrk(wrk, url, args.duration, lanes, 1, "paid.lua",
                                  (str(stack.dir / f"proofs{files}"),))  # fmt: skip
                figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
                figures["note"] = "prepaid credit debited in Redis (one Lua script), no chain"
                phases[name] = figures
                show(name, figures)

            paid_c16(PAID_C16, "16")

            # (11) and (12): every paid request settles on chain through the facilitator.
            seconds = args.official_duration
            warmup = max(args.warmup, 3.0)
            assert chain.process is not None and facilitator.process is not None
            onchain = {
                "anvil": chain.process.popen.pid,
                "facilitator": facilitator.process.popen.pid,
            }
            parts = {**{n: p.popen.pid for n, p in stack.processes.items()}, **onchain}
            figures = onchain_phase(wrk, chain, url, keys, seconds, warmup, lanes, stack.dir, parts)
            figures["note"] = (
                "x402 v2 exact through Envoy and the sidecar: each request verified and "
                "settled (EIP-3009 transferWithAuthorization on anvil) by the facilitator "
                "before it passes; pre-signed by the official x402 client"
            )
            phases[EXACT_C16] = figures
            show(EXACT_C16, figures)
            parts = {"official": server.popen.pid, **onchain}
            figures = onchain_phase(
                wrk, chain, official_url, keys, seconds, warmup, lanes, stack.dir, parts
            )
            figures["note"] = (
                f"the official x402 {version('x402')} FastAPI middleware under uvicorn "
                f"({args.workers} workers), the same facilitator and chain: each request "
                "verified, served and settled on chain; pre-signed by the official client"
            )
            phases[OFFICIAL_C16] = figures
            show(OFFICIAL_C16, figures)

            # (10h) as (10), Envoy asking over the HTTP transport.
            restart(stack, free_port(), "http", args.workers)
            stack.start_sidecar()
            paid_c16(PAID_C16_HTTP, "16h")
        finally:
            if server is not None:
                server.stop()
            stack.stop()
            facilitator.stop()


def onchain_report(results: dict[str, Any]) -> None:
    """(11) and (12) against the chain, and (10) against (12) against DESIGN.md's targets."""
    phases, ratios = results["phases"], results["ratios"]
    for name in (EXACT_C16, OFFICIAL_C16):
        if name in phases:
            chain = phases[name]["chain"]
            print(
                f"chain, {name}: {chain['settled_transfers']} transfers settled for "
                f"{chain['answered_200']} 200s ({chain['settled_client_gone']} as wrk hung "
                f"up): {'consistent' if chain['exact'] else 'MISMATCH'}"
            )
    for transport, side in (("gRPC", "sidecar"), ("HTTP", "sidecar_http")):
        if f"{side}_paid/official_x402" not in ratios:
            continue
        rps = ratios[f"{side}_paid/official_x402"]
        p50 = ratios[f"official_x402_p50/{side}_paid_p50"]
        print(
            f"versus the official x402 stack at c16, over {transport}: {rps:.0f}x the paid "
            f"throughput (target 200x: {'met' if rps >= 200 else 'not met'}), p50 {p50:.0f}x "
            f"lower (target 100x: {'met' if p50 >= 100 else 'not met'}); the sidecar debits "
            "prepaid credit, the official stack settles each request on chain"
        )


def targets(results: dict[str, Any]) -> None:
    """Issue #17's targets, each against this run's figures (where its phases ran)."""
    ratios, phases = results["ratios"], results["phases"]
    checks = [
        ("HTTP paid >= 0.8 x gRPC allow-all", ratios.get("http_paid/grpc_allow_all"), 0.8),
        ("HTTP paid >= 1.7 x gRPC paid", ratios.get("http_paid/grpc_paid"), 1.7),
        ("gRPC paid >= 0.5 x gRPC allow-all", ratios.get("paid/allow_all"), 0.5),
        ("on_success >= 0.6 x on_check (gRPC)", ratios.get("on_success/on_check"), 0.6),
        ("metered >= 0.6 x on_check (gRPC)", ratios.get("metered/on_check"), 0.6),
        ("on_success >= 0.6 x on_check (HTTP)", ratios.get("http_on_success/http_on_check"), 0.6),
        ("metered >= 0.6 x on_check (HTTP)", ratios.get("http_metered/http_on_check"), 0.6),
    ]
    for transport, prefix in (("gRPC", "5"), ("HTTP", "5h HTTP")):
        full = phases.get(f"{prefix} challenge loops, full speed")
        one = phases.get(f"{prefix} challenge loops, 1 agent")
        if full is not None:
            checks.append((f"challenge loops >= 1000/s ({transport})",
                           full["loops_per_second"], 1000))  # fmt: skip
        if one is not None:  # p50 <= 3 ms, as a ratio >= 1
            checks.append((f"challenge loop p50 <= 3 ms ({transport})",
                           3 / max(one["loop_ms"]["p50"], 1e-3), 1.0))  # fmt: skip
    print()
    for name, value, goal in checks:
        if value is not None:
            print(f"target: {name:<44}{'met' if value >= goal else 'NOT met'}")


HTTP_PAID = "4h HTTP sidecar paid direct"


def named_ratios(phases: dict[str, Any]) -> dict[str, float]:
    """The ratios by the names of both sides, each where both phases ran."""

    def rps(name: str) -> float:
        return float(phases[name]["ok_rps"])

    pairs = {
        "paid/allow_all": ("4 sidecar paid direct", "2 allow-all ext_authz"),
        "paid/allow_all_no_proof": ("4 sidecar paid direct", "2b allow-all, no proof header"),
        "paid/envoy_only": ("4 sidecar paid direct", "1 envoy only"),
        "allow_all/envoy_only": ("2 allow-all ext_authz", "1 envoy only"),
        "on_success/on_check": ("7 paid on_success", "4 sidecar paid direct"),
        "metered/on_check": ("8 paid metered", "4 sidecar paid direct"),
        "http_paid/grpc_allow_all": (HTTP_PAID, "2 allow-all ext_authz"),
        "http_paid/grpc_paid": (HTTP_PAID, "4 sidecar paid direct"),
        "http_paid/http_allow_all": (HTTP_PAID, "2h HTTP allow-all, no proof header"),
        "http_allow_all/grpc_allow_all": (
            "2h HTTP allow-all, no proof header",
            "2b allow-all, no proof header",
        ),
        "http_on_success/http_on_check": ("7h HTTP paid on_success", HTTP_PAID),
        "http_metered/http_on_check": ("8h HTTP paid metered", HTTP_PAID),
        "grpc_2_workers/1_worker": ("4 sidecar paid direct", "4w1 paid direct, 1 worker"),
        "http_2_workers/1_worker": (HTTP_PAID, "4w1h HTTP paid direct, 1 worker"),
        "vouchers/paid": (VOUCHERS, DIRECT_LANES),
        "exact/paid": (EXACT_C16, PAID_C16),
        "sidecar_paid/official_x402": (PAID_C16, OFFICIAL_C16),
        "sidecar_http_paid/official_x402": (PAID_C16_HTTP, OFFICIAL_C16),
        "sidecar_exact/official_x402": (EXACT_C16, OFFICIAL_C16),
    }
    ratios = {
        key: round(rps(a) / rps(b), 3) if rps(b) else float("inf")
        for key, (a, b) in pairs.items()
        if a in phases and b in phases
    }
    for paid, key in ((PAID_C16, "official_x402_p50/sidecar_paid_p50"),
                      (PAID_C16_HTTP, "official_x402_p50/sidecar_http_paid_p50")):  # fmt: skip
        if paid in phases and OFFICIAL_C16 in phases:
            p50 = phases[OFFICIAL_C16]["p50_ms"] / max(phases[paid]["p50_ms"], 1e-3)
            ratios[key] = round(p50, 1)
    return ratios


if __name__ == "__main__":
    main()
