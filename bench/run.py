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
                                      the response phase (one HTTP call, either transport)
  (8) paid, metered                   wrk, direct proofs; the response reports 37 of 100
                                      units (x402-usage), 37 are captured
  (4r), (4n) paid direct, gRPC        wrk, each on a fresh ledger: the debit script of
                                      before the outcome record (bench/before_record.py),
                                      then today's: the record's cost side by side

Then a second stack whose USDF is also offered as USDC (`exact`) on anvil with Circle's
FiatTokenV2_2, settled through `x402 facilitator serve`, beside the official x402 stack
(bench/official.py) on the same chain and facilitator, all at 16 connections:

  (9)  channel vouchers, 16 lanes     wrk -t16 -c16, a channel per lane; and direct proofs
                                      in the same shape (bench/channels.py)
  (10) sidecar paid direct, c16       wrk -t1 -c16, as (4)
  (11) sidecar exact on anvil, c16    wrk -t1 -c16, pre-signed EIP-3009 authorizations,
                                      each verified and settled on chain
  (11u) sidecar upto metered, c16     wrk -t1 -c16, pre-signed Permit2 authorizations of
                                      the metered route's maximum, the 37 units used
                                      settled on chain at the response
  (12) official x402 stack, c16       the same payments to the official FastAPI middleware
  (13) top-ups, durable and not       20 each through the real route, settled on anvil;
                                      then money_in: off (bench/topups.py); beside (10)

Then MCP tool calls (bench/mcp.py) through an unmodified FastMCP server, a paid call
beside the same call on a free tool: (14) free, (14p) prepaid and, with the chain, (14x)
`exact`; the throughput ratio to the free call and the p50 latency each payment adds.

It prints a table and the ratios (results["ratios"], named after both sides), checks the
ledger (debits = allowed paid requests x price, no negative balance) and the chain (USDC
settled = 200s + requests wrk hung up on) and writes bench/results.json. On a 2-core
machine it takes about 4 minutes (`--no-onchain`: 2, without (9)-(12)).

The parts: bench/harness.py (wrk, the CPU meter, the stack's files, proofs, funding),
bench/phases.py (1)-(8), bench/onchain.py (9)-(12), bench/topups.py (13), bench/mcp.py
(14), bench/report.py (the table, the ratios, the targets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.harness import HERE, ensure_wrk
from bench.mcp import run_phases as mcp_phases
from bench.onchain import onchain_phases
from bench.phases import LocalRun, selection
from bench.report import report
from sidecar.tools import ports


def arguments() -> argparse.Namespace:
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
    parser.add_argument(
        "--replay-per-payer",
        type=int,
        default=None,
        help="the sidecar's replay_per_payer (0: no kept responses, so the response phase's "
        "call carries no body)",
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    # The bench restarts the sidecar with other worker counts: ports below the kernel's
    # ephemeral ones (sidecar/tools/ports.py) are never taken meanwhile by an outgoing
    # connection of wrk's or Envoy's, as a kernel-picked one was once (the sidecar then
    # could not bind it again).
    os.environ.setdefault(ports.RANGE_ENV, ports.shard_range(0, 1))
    only = selection(args.phases)
    out = args.out or (HERE / "results.json" if only is None else None)
    wrk = ensure_wrk()
    started = time.monotonic()
    results: dict[str, Any] = {"phases": {}}
    LocalRun(wrk, args, only, results).run()
    if not args.no_onchain and (only is None or only & {"9", "10", "11", "12"}):
        onchain_phases(wrk, args, results)
    if only is None or "14" in only:  # MCP tool calls, paid beside free (bench/mcp.py)
        mcp_phases(wrk, args, results)

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


if __name__ == "__main__":
    main()
