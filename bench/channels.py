"""Channel vouchers beside direct proofs: paid requests per second through real Envoy.

    .venv/bin/python -m bench.channels [--duration 10] [--lanes 16] [--workers N]

One stack (Redis, the sidecar, Envoy answering from itself instead of an upstream, as in
bench/run.py), then wrk with `--lanes` threads of one connection each, so each lane sends
its requests strictly in order:

  direct    every request carries its own pre-signed direct proof (a fresh nonce each)
  channel   every lane has its own channel; each request carries the lane's next
            pre-signed voucher (cumulative + price, sequence + 1)

Both phases pre-sign everything beforehand, so the figures are the gateway's cost, not
the client's. It prints req/s, wrk's latency and the sidecar's own check latency (from
its decision log) for both, checks the ledger (every channel's cumulative amount = its
accepted vouchers x price, and those are wrk's 200s) and writes bench/channels.json.
About a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import redis

from bench.harness import (
    PAID_PATH,
    PRICE,
    PRICE_ATOMIC,
    ROUTES,
    CpuMeter,
    decision_latencies,
    ensure_wrk,
    fund,
    presign,
    run_wrk,
    write_bench_files,
)
from sidecar.core import protocol, vouchers
from sidecar.core.identity import Identity
from sidecar.core.money import to_decimal
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
from sidecar.tools.load import percentiles
from sidecar.tools.stack import Stack

HERE = Path(__file__).resolve().parent


def _sign_lane(job: tuple[str, str, str, int]) -> list[str]:
    """One lane's vouchers, in order: sequence 1..count, cumulative rising by the price."""
    seed, channel_id, payee, count = job
    wallet = Identity.from_seed_text(seed)
    return [
        protocol.encode_header(
            vouchers.sign_voucher(
                {
                    "channel_id": channel_id,
                    "asset": "USDF",
                    "cumulative": to_decimal(n * PRICE_ATOMIC, 6),
                    "sequence": n,
                    "resource": f"GET {PAID_PATH}",
                    "payee": payee,
                },
                wallet,
            )
        )
        for n in range(1, count + 1)
    ]


async def open_lanes(stack: Stack, wallets: list[Identity], deposit: int) -> list[str]:
    ledger = Ledger.from_url(stack.redis_url)
    channels = Channels(ledger)
    ids = []
    for wallet in wallets:
        channel_id, _ = await channels.open(
            wallet.public_key, "USDF", deposit, stack.gateway_identity.kid
        )
        ids.append(channel_id)
    await ledger.close()
    return ids


async def channel_totals(stack: Stack, wallets: list[Identity], ids: list[str]) -> int:
    ledger = Ledger.from_url(stack.redis_url)
    channels = Channels(ledger)
    total = 0
    for wallet, channel_id in zip(wallets, ids, strict=True):
        state = await channels.get(wallet.public_key, channel_id)
        assert state.cumulative == state.sequence * PRICE_ATOMIC, "a channel overcharged"
        total += state.cumulative
    await ledger.close()
    return total


def channel_latencies(log: Path, offset: int) -> list[float]:
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return [
        float(json.loads(line)["latency_ms"])
        for line in lines
        if '"authz.decision"' in line and '"reason": "channel"' in line
    ]


def redis_memory(stack: Stack) -> int:
    """Bytes Redis holds: what the ledger keeps per paid request (nonces, receipts)."""
    client = redis.Redis.from_url(stack.redis_url)
    used = int(client.info("memory")["used_memory"])
    client.close()
    return used


def pids(stack: Stack) -> dict[str, int]:
    return {name: stack.processes[name].popen.pid for name in ("envoy", "redis", "sidecar")}


def direct_phase(wrk: str, stack: Stack, lanes: int, seconds: float, per_lane: int) -> Any:
    url, payee = stack.url + PAID_PATH, stack.gateway_identity.kid
    log = stack.processes["sidecar"].log_path
    wallets = [Identity.generate() for _ in range(lanes)]
    asyncio.run(fund(stack, wallets, (per_lane + 10) * PRICE_ATOMIC))
    prefix = stack.dir / f"proofs-{time.monotonic_ns()}"
    presign(per_lane * lanes, wallets, payee, [Path(f"{prefix}.{i}") for i in range(lanes)])
    offset, meter, memory = log.stat().st_size, CpuMeter(pids(stack)), redis_memory(stack)
    figures = run_wrk(wrk, url, seconds, lanes, lanes, "paid.lua", (str(prefix),))
    figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
    figures["redis_bytes_per_request"] = round(
        (redis_memory(stack) - memory) / max(figures["requests"], 1)
    )
    figures["check_ms"] = percentiles(decision_latencies(log, offset))
    return figures


def channel_phase(wrk: str, stack: Stack, lanes: int, seconds: float, per_lane: int) -> Any:
    url, payee = stack.url + PAID_PATH, stack.gateway_identity.kid
    log = stack.processes["sidecar"].log_path
    wallets = [Identity.generate() for _ in range(lanes)]
    asyncio.run(fund(stack, wallets, (per_lane + 10) * PRICE_ATOMIC))
    ids = asyncio.run(open_lanes(stack, wallets, (per_lane + 10) * PRICE_ATOMIC))
    jobs = [(w.seed_text, cid, payee, per_lane) for w, cid in zip(wallets, ids, strict=True)]
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        signed = pool.map(_sign_lane, jobs)
    prefix = stack.dir / f"vouchers-{time.monotonic_ns()}"
    for i, lane in enumerate(signed):
        Path(f"{prefix}.{i}").write_text("\n".join(lane) + "\n")
    offset, meter, memory = log.stat().st_size, CpuMeter(pids(stack)), redis_memory(stack)
    figures = run_wrk(wrk, url, seconds, lanes, lanes, "paid.lua", (str(prefix),))
    figures["cpu_us_per_request"] = meter.per_request(figures["requests"])
    figures["redis_bytes_per_request"] = round(
        (redis_memory(stack) - memory) / max(figures["requests"], 1)
    )
    figures["check_ms"] = percentiles(channel_latencies(log, offset))
    # No channel charged more than its vouchers (channel_totals), and the vouchers the ledger
    # accepted are wrk's 200s, but for the requests in flight when wrk stopped counting (one
    # per lane; wrk's own count is seen to miss one more now and then).
    accepted = asyncio.run(channel_totals(stack, wallets, ids)) // PRICE_ATOMIC
    unanswered = 2 * lanes + figures["socket_errors"]
    assert 0 <= accepted - figures["ok"] <= unanswered, (accepted, figures)
    figures["accepted_vouchers"] = accepted
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="channel vouchers vs direct proofs")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="direct, channel; repeated")
    parser.add_argument("--lanes", type=int, default=16, help="wrk threads = connections")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--expect-rps", type=int, default=4000, help="to size the pre-signing")
    parser.add_argument("--out", type=Path, default=HERE / "channels.json")
    args = parser.parse_args()
    wrk = ensure_wrk()
    lanes, seconds = args.lanes, args.duration
    per_lane = int(args.expect_rps * seconds / lanes) + 200
    stack = Stack(ROUTES, settings={"max_direct_ttl_seconds": 3600}, workers=args.workers)
    results: dict[str, Any] = {"lanes": lanes, "workers": args.workers, "rounds": []}
    try:
        write_bench_files(stack)
        stack.start_redis()
        stack.start_envoy()
        stack.start_sidecar()
        # Warm up (imports, connections, script loads) before measuring anything.
        run_wrk(wrk, stack.url + "/api/v1/bench/free", 2, lanes, lanes)
        for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both
            direct = direct_phase(wrk, stack, lanes, seconds, per_lane)
            vouchered = channel_phase(wrk, stack, lanes, seconds, per_lane)
            results["rounds"].append({"direct": direct, "channel": vouchered})
            for name, figures in (("direct", direct), ("channel", vouchered)):
                check, cpu = figures["check_ms"], figures["cpu_us_per_request"]
                print(
                    f"bench: {name:<8} {figures['ok_rps']:>7.0f} paid req/s  non-2xx "
                    f"{figures['non_2xx']}  wrk p50 {figures['p50_ms']:.2f} ms "
                    f"p99 {figures['p99_ms']:.2f} ms  check p50 {check['p50']} ms "
                    f"p99 {check['p99']} ms  CPU µs/req sidecar {cpu['sidecar']:.0f} "
                    f"redis {cpu['redis']:.0f} envoy {cpu['envoy']:.0f}  Redis memory "
                    f"+{figures['redis_bytes_per_request']} B/req",
                    flush=True,
                )
    finally:
        stack.stop()

    def median(name: str, figure: str = "ok_rps", part: str = "") -> float:
        values = sorted(
            r[name][figure][part] if part else r[name][figure] for r in results["rounds"]
        )
        return float(values[len(values) // 2])

    results["median_rps"] = {"direct": median("direct"), "channel": median("channel")}
    results["ratio_channel_to_direct"] = round(median("channel") / median("direct"), 3)
    cpu = {
        name: {part: median(name, "cpu_us_per_request", part) for part in ("sidecar", "redis")}
        for name in ("direct", "channel")
    }
    results["median_cpu_us_per_request"] = cpu
    results["unix_time"] = int(time.time())
    print(
        f"bench: median paid req/s: direct {median('direct'):.0f}, channel "
        f"{median('channel'):.0f}; channel / direct = {results['ratio_channel_to_direct']} "
        f"({lanes} lanes, {args.workers} sidecar workers, price {PRICE})\n"
        f"bench: median CPU µs per paid request: sidecar {cpu['direct']['sidecar']:.0f} → "
        f"{cpu['channel']['sidecar']:.0f}, redis {cpu['direct']['redis']:.0f} → "
        f"{cpu['channel']['redis']:.0f} (direct → channel)"
    )
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
