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

It prints a table and the ratios, checks the ledger (debits = allowed paid requests x
price, no negative balance) and writes bench/results.json. On a 2-core machine it takes
about 2 minutes.
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
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.tools.load import percentiles
from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port

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
) -> dict[str, Any]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        script,
        url,
        "--",
        *args,
    ]
    done = subprocess.run(
        argv, cwd=WRK_SCRIPTS, capture_output=True, text=True, timeout=seconds + 60, check=False
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


def load_phase(stack: Stack, parts: dict[str, int], seconds: float, agents: int) -> dict[str, Any]:
    """One run of phase (5), printed as it ends."""
    figures = run_load(stack, seconds, agents, "--processes", str(LOAD_PROCESSES), parts=parts)
    cpu, gen, loop = figures["cpu_us_per_loop"], figures["generator_cpu"], figures["loop_ms"]
    print(
        f"bench: {f'5 challenge loops, {agents} agents':<30} "
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
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
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
        stack.write_files()
        envoy_file = stack.dir / "envoy.yaml"
        config = bench_envoy(yaml.safe_load(envoy_file.read_text()), bare_port)
        envoy_file.write_text(yaml.safe_dump(config, sort_keys=False))
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
            figures = run_wrk(
                wrk, url, args.duration, args.connections, args.threads, script, run_args
            )
            figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
            phases[name] = figures
            print(
                f"bench: {name:<30} {figures['ok_rps']:>8.0f} req/s  "
                f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms",
                flush=True,
            )
            return figures

        wrk_phase("1 envoy only", bare_url)
        allow_all = stack._spawn(
            "allow_all",
            [sys.executable, "-m", "bench.allow_all", "--port", str(stack.ports["grpc"]),
             "--workers", str(args.workers)],
        )  # fmt: skip
        wait_ports(stack.ports["grpc"], args.workers, allow_all)
        plain = wrk_phase("2b allow-all, no proof header", free_url)

        # Unique proofs for (2) and (4), enough for the baseline's speed; the allow-all
        # server spends none, so (4) replays the very requests of (2).
        wallets = [Identity.generate() for _ in range(PAYERS)]
        budget = plain["ok_rps"] * 1.3
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

        wrk_phase("2 allow-all ext_authz", paid_url, paid=True)
        allow_all.stop()
        del stack.processes["allow_all"]

        stack.start_sidecar()
        wrk_phase("3 sidecar free route", free_url)
        before = envoy_stat(stack, "http.ingress.ext_authz.ok")
        wrk_phase("4 sidecar paid direct", paid_url, paid=True)

        # (5) challenge loops with x402 load: at the stack's limit, then one agent (latency).
        phases["5 challenge loops, full speed"] = load_phase(
            stack, parts(), args.duration, LOAD_AGENTS
        )
        phases["5 challenge loops, 1 agent"] = load_phase(
            stack, parts(), max(3.0, args.duration / 2), 1
        )

        # (6) paid requests at a constant rate: the sidecar's own check latency, from its
        # decision log, and the client's through Envoy.
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
        wrk_phase("7 paid on_success", stack.url + HELD_PATH, paid=True, prefix=".held")
        wrk_phase("8 paid metered", stack.url + METERED_PATH, paid=True, prefix=".metered")
        # Holds cut off when wrk hung up expire; the sweeper releases them.
        time.sleep(HOLD_SECONDS + 2.5)
        # wrk's paid runs (warm-up and measured) each leave up to `connections` in flight.
        results["ledger"] = reconcile(stack, envoy_allowed, 2 * args.connections)
    finally:
        stack.stop()

    results["machine"] = {
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "workers": args.workers,
        "envoy_concurrency": args.envoy_concurrency,
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration:g}s",
    }
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results, args.rate)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {args.out} ({results['seconds']} s)")


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
    envoy = phases["1 envoy only"]["ok_rps"]
    allow = phases["2 allow-all ext_authz"]["ok_rps"]
    paid = phases["4 sidecar paid direct"]["ok_rps"]
    results["ratios"] = {
        "(4)/(2) paid / allow-all": round(paid / allow, 3),
        "(4)/(1) paid / envoy only": round(paid / envoy, 3),
        "(2)/(1) allow-all / envoy only": round(allow / envoy, 3),
        "(4)/(2b) paid / allow-all without proof header": round(
            paid / phases["2b allow-all, no proof header"]["ok_rps"], 3
        ),
        "(7)/(4) on_success / on_check": round(phases["7 paid on_success"]["ok_rps"] / paid, 3),
        "(8)/(4) metered / on_check": round(phases["8 paid metered"]["ok_rps"] / paid, 3),
    }
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
    check = phases[f"6 paid at {rate:.0f} req/s"]["sidecar_check_ms"]
    print(f"{f'sidecar check at {rate:.0f} paid req/s':<48}p50 {check['p50']} ms, "
          f"p99 {check['p99']} ms")  # fmt: skip
    print(f"{'challenge loop, 1 agent':<48}p50 "
          f"{phases['5 challenge loops, 1 agent']['loop_ms']['p50']} ms")  # fmt: skip
    ledger = results["ledger"]
    print(
        f"ledger: {ledger['paid_decisions']} paid decisions x {ledger['price_atomic']} = "
        f"{ledger['paid_decisions'] * ledger['price_atomic']}, + {ledger['captures']} "
        f"captures ({ledger['metered_captures']} metered), debited "
        f"{ledger['debited_atomic']}; receipts {ledger['receipts']}, spent nonces "
        f"{ledger['spent_nonces']}, lowest balance {ledger['lowest_balance']}; Envoy passed "
        f"{ledger['envoy_allowed']} on ({ledger['charged_client_gone']} charged as wrk hung "
        f"up): {'exact, no double spend' if ledger['exact'] else 'MISMATCH'}"
    )


if __name__ == "__main__":
    main()
