"""What every bench script shares: the bench's routes and prices, wrk and its figures,
the CPU meter, the stack's files and restarts, pre-signed proofs, funding and the
ledger's totals. The phases that use them: bench/phases.py (1)-(8), bench/onchain.py
(9)-(12), bench/channels.py and bench/profile.py; the report: bench/report.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import multiprocessing
import os
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


def peak_rss_mb(pid: int) -> float:
    """The largest peak resident set (VmHWM, since the process started) of a process and
    its live descendants, in MB: for the sidecar, its busiest worker's."""
    peak = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                peak = max(peak, peak_rss_mb(int(child)))
    except (OSError, ValueError):
        pass
    return round(peak, 1)


def ledger_bytes(stack: Stack) -> int:
    """Redis's used_memory (INFO memory): the ledger's whole footprint."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


class CpuMeter:
    """CPU µs per request of each part of the stack (and of wrk) during one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)

    def per_request(self, requests: int) -> dict[str, float]:
        used = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used["client"] = (after.ru_utime + after.ru_stime) - (
            self.children.ru_utime + self.children.ru_stime
        )
        return {name: round(seconds * 1e6 / max(requests, 1), 1) for name, seconds in used.items()}

    def peak_rss(self) -> dict[str, float]:
        """Each part's peak resident set so far, MB (the sidecar: its largest worker)."""
        return {name: peak_rss_mb(pid) for name, pid in self.pids.items()}


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


def reset_ledger(stack: Stack, wallets: list[Identity], atomic: int) -> None:
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


def show(name: str, figures: dict[str, Any]) -> None:
    print(
        f"bench: {name:<30} {figures['ok_rps']:>8.0f} req/s  "
        f"p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms",
        flush=True,
    )
