"""MCP tool calls through the gateway: a paid call beside the same call on a free tool.

    .venv/bin/python -m bench.mcp [--duration 5] [--connections 16] [--no-exact]

One stack: Redis, the sidecar, Envoy and an unmodified FastMCP server (stateless, JSON
answers; sidecar/tools/mcp_upstream.py) behind an MCP route pricing `get_weather` at
0.001 USDF and leaving `echo` free; with `exact`, USDF is also offered as USDC on anvil,
settled through `x402 facilitator serve`. wrk POSTs JSON-RPC tools/call bodies
(bench/wrk/mcp.lua), all at the same concurrency:

  (14)  MCP free tool call            tools/call echo, no payment
  (14p) MCP paid tool call, prepaid   tools/call get_weather, a pre-signed direct proof
                                      per request in params._meta["x402/payment"]
  (14x) MCP paid tool call, exact     the same with a pre-signed EIP-3009 authorization,
                                      verified and settled on chain per request

The report: each phase's req/s and p50, and per payment kind the throughput ratio to the
free call and the latency it adds (p50 paid - p50 free). The MCP server's own call count
and the ledger check that every paid 200 ran the tool once and was charged once.
`make bench` runs it as phases 14 (`--phases 14`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import CpuMeter, ensure_wrk, fund, run_wrk
from sidecar.core import mcp, protocol
from sidecar.core.identity import Identity
from sidecar.tools.mcp_stack import McpStack

HERE = Path(__file__).resolve().parent
PATH, PAID_TOOL, FREE_TOOL = "/mcp", "get_weather", "echo"
PRICE, PRICE_ATOMIC = "0.001", 1_000
ROUTES = {
    "tools": {"method": "POST", "path": PATH, "mcp": {"tools": {PAID_TOOL: PRICE}}},
}
FREE, PREPAID, EXACT = (
    "14 MCP free tool call",
    "14p MCP paid tool call, prepaid",
    ("14x MCP paid tool call, exact"),
)
PAYERS, PROOF_TTL, EXACT_TIMEOUT = 32, 3000, 3000
ONCHAIN_TIMEOUT = 30


def call(tool: str, arguments: dict[str, Any], payment: dict[str, Any] | None = None) -> str:
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    if payment is not None:
        params["_meta"] = {mcp.PAYMENT_META: payment}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})


def _sign(job: tuple[list[str], int, str, int]) -> list[str]:
    """Direct prepaid proofs for the paid tool, each in the x402 v2 envelope of `_meta`."""
    seeds, count, payee, expires_at = job
    wallets = [Identity.from_seed_text(seed) for seed in seeds]
    bodies = []
    for i in range(count):
        terms = {
            "version": protocol.VERSION,
            "scheme": protocol.SCHEME,
            "nonce": protocol.new_nonce(),
            "resource": f"POST {mcp.tool_path(PATH, PAID_TOOL)}",
            "asset": "USDF",
            "amount": PRICE,
            "payee": payee,
            "expires_at": expires_at,
        }
        proof = protocol.sign_proof(terms, wallets[i % len(wallets)])
        bodies.append(call(PAID_TOOL, {"city": "Paris"}, {"x402Version": 2, "payload": proof}))
    return bodies


def prepaid_bodies(count: int, wallets: list[Identity], payee: str) -> list[str]:
    seeds, jobs = [w.seed_text for w in wallets], os.cpu_count() or 1
    job = ([*seeds], count // jobs + 1, payee, int(time.time()) + PROOF_TTL)
    with multiprocessing.Pool(jobs) as pool:
        return [b for batch in pool.map(_sign, [job] * jobs) for b in batch][:count]


def exact_bodies(stack: McpStack, chain: Any, keys: list[str], count: int) -> list[str]:
    """Pre-signed `exact` payments for the paid tool's payment-required answer."""
    from bench import official
    from bench.onchain import PAYER_USDC

    answer = httpx.post(
        stack.url + PATH,
        content=call(PAID_TOOL, {"city": "Paris"}),
        headers={"content-type": "application/json", "accept": "application/json"},
        timeout=30,
    ).json()
    required = answer["result"]["structuredContent"]
    model = official.decode_required(protocol.encode_header(required))
    jobs = official.sign_jobs(model, chain.network, chain.token, keys, PAYER_USDC, count)
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        batches = pool.map(official.sign_batch, jobs)
    headers = [h for row in zip(*batches, strict=True) for h in row][:count]
    return [call(PAID_TOOL, {"city": "Paris"}, protocol.decode_header(h)) for h in headers]


def tool_calls(stack: McpStack) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(stack.server_url + "/calls", timeout=10).json()
    return counts


def phase(
    wrk: str, stack: McpStack, bodies: list[str], seconds: float, connections: int,
    workdir: Path, timeout: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """wrk -t1 -c`connections` with these bodies (one: sent again and again)."""
    prefix = workdir / f"mcp-{time.monotonic_ns()}"
    prefix.with_suffix(".0").write_text("\n".join(bodies) + "\n")
    before = tool_calls(stack)
    meter = CpuMeter({name: p.popen.pid for name, p in stack.processes.items()})
    args = (str(prefix), "repeat" if len(bodies) == 1 else "once")
    figures = run_wrk(wrk, stack.url + PATH, seconds, connections, 1, "mcp.lua", args, timeout)
    figures["cpu_us_per_request"] = meter.per_request(figures["ok"])
    after = tool_calls(stack)
    figures["tool_calls"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return figures


def compare(phases: dict[str, Any], paid: str, free: str) -> dict[str, float]:
    ratio = phases[paid]["ok_rps"] / max(phases[free]["ok_rps"], 1e-9)
    added = phases[paid]["p50_ms"] - phases[free]["p50_ms"]
    return {"throughput_ratio": round(ratio, 3), "added_p50_ms": round(added, 3)}


def run_phases(wrk: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """`make bench`'s (14): with the chain unless --no-onchain."""
    if getattr(args, "no_onchain", False) or getattr(args, "no_exact", False):
        measure(wrk, args, results)
    else:
        with_chain(wrk, args, results)


def measure(
    wrk: str, args: argparse.Namespace, results: dict[str, Any], chain: Any = None,
    keys: list[str] | None = None, settings: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """(14), (14p) and, with a chain, (14x) into results["phases"] and results["mcp"]."""
    phases = results.setdefault("phases", {})
    config = {"max_direct_ttl_seconds": 3600, **(settings or {})}
    with (
        tempfile.TemporaryDirectory(prefix="x402-bench-mcp-") as tmp,
        McpStack(ROUTES, settings=config, json=True, stateless=True, workers=args.workers) as stack,
    ):
        workdir, connections = Path(tmp), args.connections
        free = [call(FREE_TOOL, {"text": "hello"})]
        run_wrk(wrk, stack.url + PATH, args.warmup, connections, 1, "mcp.lua",
                (str(_write(workdir, free)), "repeat"))  # fmt: skip
        phases[FREE] = phase(wrk, stack, free, args.duration, connections, workdir)
        wallets = [Identity.generate() for _ in range(PAYERS)]
        count = int(phases[FREE]["ok_rps"] * args.duration * 1.5) + 200
        asyncio.run(fund(stack, wallets, count * PRICE_ATOMIC))
        bodies = prepaid_bodies(count, wallets, stack.gateway_identity.kid)
        phases[PREPAID] = phase(wrk, stack, bodies, args.duration, connections, workdir)
        comparison = {"prepaid": compare(phases, PREPAID, FREE)}
        if chain is not None and keys:
            lanes = len(keys)
            free_lanes = f"{FREE}, c{lanes}"
            phases[free_lanes] = phase(wrk, stack, free, args.duration, lanes, workdir)
            signed = exact_bodies(stack, chain, keys, int(40 * args.duration) + 4 * lanes)
            phases[EXACT] = phase(
                wrk, stack, signed, args.duration, lanes, workdir, ONCHAIN_TIMEOUT
            )
            comparison["exact"] = compare(phases, EXACT, free_lanes)
    results["mcp"] = comparison


def _write(workdir: Path, bodies: list[str]) -> Path:
    prefix = workdir / "warm"
    prefix.with_suffix(".0").write_text("\n".join(bodies) + "\n")
    return prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-exact", action="store_true", help="skip (14x): no chain")
    args = parser.parse_args()
    wrk = ensure_wrk()
    results: dict[str, Any] = {"phases": {}}
    run_phases(wrk, args, results)
    for name, figures in results["phases"].items():
        print(f"{name:<40}{figures['ok_rps']:>9.1f} req/s  p50 {figures['p50_ms']:.2f} ms  "
              f"tools {figures['tool_calls']}")  # fmt: skip
    print(json.dumps(results["mcp"], indent=1))
    (HERE / "mcp.json").write_text(json.dumps(results, indent=2) + "\n")


def with_chain(wrk: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """(14)-(14x) with USDF backed by USDC on anvil and the facilitator."""
    from eth_account import Account

    from bench.onchain import LANES, PAYER_USDC, chain_tools
    from sidecar.tools.chain import AnvilChain
    from sidecar.tools.onchain import FacilitatorProcess, exact_settings

    chain_tools()
    keys = [Account.create().key.hex() for _ in range(LANES)]
    mint = {Account.from_key(key).address: PAYER_USDC for key in keys}
    with tempfile.TemporaryDirectory(prefix="x402-bench-") as tmp, AnvilChain(mint=mint) as chain:
        facilitator = FacilitatorProcess(chain, Path(tmp)).start()
        try:
            settings = exact_settings(chain, facilitator, exact_max_timeout_seconds=EXACT_TIMEOUT)
            measure(wrk, args, results, chain, keys, settings)
        finally:
            facilitator.stop()


if __name__ == "__main__":
    main()
