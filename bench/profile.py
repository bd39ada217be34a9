"""Where a paid check's CPU goes: py-spy on one sidecar worker while wrk sends paid requests.

Starts the bench's stack (Redis, Envoy answering for the upstream, the sidecar), drives
paid direct proofs through Envoy as `bench.run` phase 4 does, records one worker with
py-spy and prints µs of that worker's CPU per paid check by category: each category's
share of the samples times the worker's measured user CPU time over the checks it
answered (its decision lines); kernel time is its own line.

    python -m bench.profile --seconds 10 [--native] [--raw out.txt]
    python -m bench.profile --strace    # syscalls per check instead (strace -c, main thread)
    python -m bench.profile --route held --transport http
                                        # the check and the response phase, both over HTTP
    python -m bench.profile --route free  # a free route's check: the transport's own cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    FREE_PATH,
    HELD_PATH,
    METERED_PATH,
    PAID_PATH,
    PAYERS,
    PRICE_ATOMIC,
    ROUTES,
    ensure_wrk,
    fund,
    presign,
    run_wrk,
    write_bench_files,
)
from sidecar.core.identity import Identity
from sidecar.tools.stack import Stack

TRANSPORTS = ("grpc", "http")
ROUTE_PATHS = {
    "paid": PAID_PATH,
    "free": FREE_PATH,
    "held": HELD_PATH,
    "metered": METERED_PATH,
}
# The decision lines that count as the route's checks.
REASONS = {"paid": "paid", "free": "free", "held": "captured", "metered": "captured"}

CATEGORIES = (
    "transport framework",
    "Ed25519 verify",
    "Ed25519 sign",
    "JSON (+base64)",
    "response building",
    "Redis client",
    "decision line",
    "metrics",
    "glue",
    "other",
)
# A sample goes to the category of its innermost frame that one of RULES names, so time
# in asyncio or builtins under a sidecar function counts for that function's category;
# one with none of them but a framework frame is the framework's; else "other".
# (fragment of "/" + file, function or "" for any, category); the first match wins.
RULES: tuple[tuple[str, str, str], ...] = (
    ("/nacl/", "crypto_sign_open", "Ed25519 verify"),
    ("/nacl/", "verify", "Ed25519 verify"),
    ("/nacl/", "crypto_sign", "Ed25519 sign"),
    ("/nacl/", "sign", "Ed25519 sign"),
    ("/sidecar/core/identity.py", "verify", "Ed25519 verify"),
    ("/sidecar/core/identity.py", "sign", "Ed25519 sign"),
    ("/json/", "", "JSON (+base64)"),
    ("/base64.py", "", "JSON (+base64)"),
    ("/sidecar/core/protocol.py", "canonical_json", "JSON (+base64)"),
    ("/sidecar/core/protocol.py", "loads_strict", "JSON (+base64)"),
    ("/sidecar/core/protocol.py", "_no_duplicate_keys", "JSON (+base64)"),
    ("/sidecar/core/protocol.py", "encode", "JSON (+base64)"),  # json_encoder's
    ("/prometheus_client/", "", "metrics"),
    ("/sidecar/server/metrics.py", "", "metrics"),
    ("/hiredis", "", "Redis client"),
    ("/sidecar/ledger/", "", "Redis client"),
    ("/sidecar/server/logs.py", "", "decision line"),
    ("/sidecar/server/authz/grpc_answers.py", "", "response building"),
    ("/sidecar/server/authz/http_transport.py", "ok", "response building"),  # HttpAnswers
    ("/sidecar/server/authz/http_transport.py", "denied", "response building"),
    ("/sidecar/server/authz/http_transport.py", "_lines", "response building"),
    ("/sidecar/server/authz/http_transport.py", "", "transport framework"),  # the HTTP transport
    # The response phase's answers (held and metered routes), either transport.
    ("/sidecar/server/processing/http_transport.py", "encode", "response building"),
    ("/sidecar/server/processing/http_transport.py", "_header_lines", "response building"),
    ("/sidecar/server/processing/grpc_transport.py", "message", "response building"),
    ("/sidecar/server/processing/grpc_transport.py", "_set", "response building"),
    ("/sidecar/server/processing/grpc_transport.py", "header", "response building"),
    ("/sidecar/server/processing/phase.py", "receipt_headers", "response building"),
    ("/sidecar/core/decision.py", "carrying", "response building"),
    ("/sidecar/", "", "glue"),
)
FRAMEWORK = (
    "/grpc",
    "/aiohttp/",
    "/httptools",
    "/google/protobuf",
    "/envoy/",
    "/asyncio/",
    "/uvloop",
    "/threading.py",  # the worker's only other Python thread: grpc.aio's poller
)
# The worker's start-up, below the event loop: outside every check.
OUTER = ("/sidecar/server/supervisor.py", "/sidecar/tools/cli/")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_parts(frame: str) -> tuple[str, str]:
    """A py-spy frame `function (file:line)` → (function, file); a bare name → (name, "")."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match["function"], match["file"]


def categorize(stack: Iterable[str]) -> str:
    """The category of one sampled stack, its frames listed root first."""
    found = "other"
    for frame in reversed(list(stack)):
        function, file = frame_parts(frame)
        text = "/" + (file or function)  # native frames name a library, not a Python file
        if any(fragment in text for fragment in OUTER):
            break
        method = function.rpartition(".")[2]  # py-spy writes Class.method
        for fragment, name, category in RULES:
            if fragment in text and (not name or method == name):
                return category
        if any(fragment in text for fragment in FRAMEWORK):
            found = "transport framework"
    return found


def parse_raw(lines: Iterable[str]) -> Counter[str]:
    """py-spy's raw (collapsed) output → samples per category."""
    samples: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            samples[categorize(stack.split(";"))] += int(count)
    return samples


def breakdown(samples: Counter[str], user_seconds: float, checks: int) -> dict[str, float]:
    """µs of user CPU per check by category: the category's share of the samples."""
    total = sum(samples.values()) or 1
    return {c: samples[c] / total * user_seconds * 1e6 / max(checks, 1) for c in CATEGORIES}


def strace_counts(lines: Iterable[str]) -> dict[str, int]:
    """`strace -c` summary → calls per syscall."""
    calls = {}
    for line in lines:
        fields = line.split()
        if (
            len(fields) in (5, 6)
            and fields[0].replace(".", "", 1).isdigit()
            and fields[-1] != "total"
        ):
            calls[fields[-1]] = int(fields[3])
    return calls


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of a process's main thread."""
    total = 0
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if "ctxt_switches:" in line:
            total += int(line.split()[1])
    return total


def worker_pids(log: str, first_port: int) -> dict[int, int]:
    """Worker index → pid, from the workers' `sidecar.started` lines."""
    pids = {}
    for line in log.splitlines():
        if '"sidecar.started"' in line:
            event = json.loads(line)
            port = int(str(event["listen_grpc"]).rpartition(":")[2])
            pids[port - first_port] = int(event["pid"])
    return pids


def paid_checks(log: str, worker: int, reason: str = "paid") -> int:
    """Paid decision lines of one worker (DecisionLog writes them with json.dumps): `paid`
    on a route charged on check, `captured` for one charged on success."""
    mark, said = f'"worker": {worker},', f'"reason": "{reason}"'
    return sum(1 for line in log.splitlines() if said in line and mark in line)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="recorded wrk run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--worker", type=int, default=-1, help="which one (default: the last)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=2000, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--budget", type=float, default=4000.0, help="proofs per second")
    parser.add_argument("--transport", choices=TRANSPORTS, default="grpc")
    parser.add_argument(
        "--route", choices=sorted(ROUTE_PATHS), default="paid", help="the bench's route"
    )
    parser.add_argument(
        "--replay-per-payer",
        type=int,
        default=None,
        help="the sidecar's replay_per_payer (0: no kept responses, so a held route's "
        "response phase call carries no body)",
    )
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--strace", action="store_true", help="count syscalls, no py-spy")
    return parser.parse_args()


@dataclass(frozen=True)
class Recording:
    """One worker during the recorded wrk run: the tracer's output and what it answered."""

    pid: int
    lines: list[str]  # py-spy's raw stacks, or strace's summary
    checks: int  # paid (or captured) checks the worker answered
    user: float  # CPU seconds
    system: float
    switches: int  # context switches of its main thread
    ok_rps: float  # wrk's 2xx per second through Envoy


def presign_proofs(args: argparse.Namespace, stack: Stack) -> str:
    """Fund the payers and pre-sign the warm-up's and the run's proofs; the route's URL."""
    wallets = [Identity.generate() for _ in range(PAYERS)]
    count = int(args.budget * args.seconds) + 500
    warm_count = int(args.budget * args.warmup) + 500
    asyncio.run(fund(stack, wallets, 2 * (count + warm_count) * PRICE_ATOMIC))
    payee = stack.gateway_identity.kid
    path = ROUTE_PATHS[args.route]
    presign(warm_count, wallets, payee, [stack.dir / "warm.0"], path)
    presign(count, wallets, payee, [stack.dir / "proofs.0"], path)
    return stack.url + path


def tracer(args: argparse.Namespace, pid: int, raw: Path) -> list[str]:
    if args.strace:  # the main thread only: the servicer's, not gRPC's poller
        return [shutil.which("strace") or "strace", "-c", "-p", str(pid), "-o", str(raw)]
    return [str(Path(sys.executable).parent / "py-spy"), "record", "-r", str(args.rate),
            "-p", str(pid), "-f", "raw", "-o", str(raw),
            "-d", str(round(args.seconds) + 2),
            # py-spy refuses --native with --nonblocking: native stacks pause the process
            *(["--native"] if args.native else ["--nonblocking"])]  # fmt: skip


def record(args: argparse.Namespace, wrk: str, stack: Stack, worker: int) -> Recording:
    """Warm up, attach the tracer to the worker, run wrk, count what the worker did."""
    url = presign_proofs(args, stack)
    reason = REASONS[args.route]
    sidecar = stack.processes["sidecar"]
    pid = worker_pids(sidecar.log(), stack.ports["grpc"])[worker]
    if args.warmup:
        run_wrk(wrk, url, args.warmup, args.connections, 1, "paid.lua", (str(stack.dir / "warm"),))
    time.sleep(0.2)  # the warm-up's last decision lines
    checks_before = paid_checks(sidecar.log(), worker, reason)
    raw = args.raw or stack.dir / ("strace.txt" if args.strace else "pyspy.txt")
    spy = subprocess.Popen(
        tracer(args, pid, raw), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # attached
    user0, sys0 = cpu_times(pid)
    switches0 = context_switches(pid)
    figures = run_wrk(
        wrk, url, args.seconds, args.connections, 1, "paid.lua", (str(stack.dir / "proofs"),)
    )
    user1, sys1 = cpu_times(pid)
    switches1 = context_switches(pid)
    time.sleep(0.2)
    checks = paid_checks(sidecar.log(), worker, reason) - checks_before
    if args.strace:
        spy.send_signal(signal.SIGINT)  # strace detaches and writes its summary
    spy.wait(timeout=60)
    # The tracer ran a little longer than wrk: its samples are shares, times are measured.
    lines = raw.read_text().splitlines()
    return Recording(
        pid, lines, checks, user1 - user0, sys1 - sys0, switches1 - switches0, figures["ok_rps"]
    )


def print_syscalls(args: argparse.Namespace, worker: int, rec: Recording) -> None:
    calls, checks = strace_counts(rec.lines), rec.checks
    print(f"profile: worker {worker} answered {checks} {args.route} checks; syscalls per check "
          "on its main thread (strace slows it: counts, not times)")  # fmt: skip
    for name, count in sorted(calls.items(), key=lambda item: -item[1]):
        print(f"{name:<24}{count / max(checks, 1):>10.2f}")
    print(f"{'total':<24}{sum(calls.values()) / max(checks, 1):>10.2f}")


def print_breakdown(args: argparse.Namespace, worker: int, rec: Recording) -> None:
    samples, checks = parse_raw(rec.lines), rec.checks
    per = breakdown(samples, rec.user, checks)
    native = " (native)" if args.native else ""
    print(f"profile: {rec.ok_rps:.0f} {args.route} req/s through Envoy, transport "
          f"{args.transport}; worker {worker} (pid {rec.pid}) answered {checks} {args.route} "
          f"checks, {sum(samples.values())} samples{native}")  # fmt: skip
    print(f"{'category':<24}{'µs/check':>10}{'share':>8}")
    for category in CATEGORIES:
        share = samples[category] / max(sum(samples.values()), 1)
        print(f"{category:<24}{per[category]:>10.1f}{share:>8.1%}")
    print(f"{'user total':<24}{rec.user * 1e6 / max(checks, 1):>10.1f}")
    print(f"{'kernel (system time)':<24}{rec.system * 1e6 / max(checks, 1):>10.1f}")
    print(f"{'context switches':<24}{rec.switches / max(checks, 1):>10.2f}"
          "  per check, main thread")  # fmt: skip
    if args.raw:
        print(f"profile: raw stacks in {args.raw}")


def main() -> None:
    args = arguments()
    worker = args.worker if args.worker >= 0 else args.workers - 1
    wrk = ensure_wrk()
    settings: dict[str, Any] = {"max_direct_ttl_seconds": 3600}
    if args.replay_per_payer is not None:
        settings["replay_per_payer"] = args.replay_per_payer
    stack = Stack(
        ROUTES,
        settings=settings,
        workers=args.workers,
        envoy_concurrency=1,
        transport=args.transport,
    )
    try:
        write_bench_files(stack)
        stack.start_redis()
        stack.start_envoy()
        stack.start_sidecar()
        recording = record(args, wrk, stack, worker)
    finally:
        stack.stop()
    if args.strace:
        print_syscalls(args, worker, recording)
    else:
        print_breakdown(args, worker, recording)


if __name__ == "__main__":
    main()
