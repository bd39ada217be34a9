"""(9)-(12): channel vouchers, `exact` and `upto` on anvil and the official x402 stack, on a
second stack whose USDF is also offered as USDC (`exact`, `upto`) on anvil with Circle's
FiatTokenV2_2, settled through `x402 facilitator serve`, beside the official x402 stack
(bench/official.py) on the same chain and facilitator, all at 16 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from bench import channels, official, topups
from bench.harness import (
    FREE_PATH,
    METERED_PATH,
    PAID_PATH,
    PAYERS,
    PRICE_ATOMIC,
    ROUTES,
    UNIT_PRICE_ATOMIC,
    UNITS_USED,
    CpuMeter,
    fund,
    presign,
    restart,
    run_wrk,
    show,
    write_bench_files,
)
from bench.report import (
    DIRECT_LANES,
    EXACT_C16,
    OFFICIAL_C16,
    OFFICIAL_PROJECT_C16,
    PAID_C16,
    PAID_C16_HTTP,
    UPTO_C16,
    VOUCHERS,
)
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity, write_secret
from sidecar.tools import permit2
from sidecar.tools.chain import AnvilChain, install_chain_tools
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, operator
from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port, wait_http

LANES = 16  # the concurrency at which the sidecar is compared with the official stack
EXACT_TIMEOUT = 900  # seconds pre-signed EIP-3009 authorizations stay valid
PAYER_USDC = 10**12  # atomic USDC minted to each EVM payer: never the limit
ONCHAIN_TIMEOUT = 30  # wrk's per-request timeout (s) where each request settles on chain


def chain_tools() -> None:
    """anvil and Circle's USDC where the tests find them (the Makefile's ANVIL etc., the
    checkout's .tools), else installed once into the per-user cache, as `x402 demo` does."""
    try:
        install_chain_tools(lambda what: print(f"bench: installing {what}", flush=True))
    except X402Error as error:
        raise SystemExit(f"bench: the chain's tools are missing: {error}") from None


def sign_exact(
    required_header: str, chain: AnvilChain, keys: list[str], count: int, scheme: str = "exact"
) -> list[str]:
    """`count` PAYMENT-SIGNATURE values for a 402's `exact` (or `upto`) offer, signed by the
    official x402 client (each a fresh nonce), spread over the payers."""
    required = official.decode_required(required_header)
    jobs = official.sign_jobs(required, chain.network, chain.token, keys, PAYER_USDC, count, scheme)
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        batches = pool.map(official.sign_batch, jobs)
    # Interleaved, so that consecutive requests come from different payers.
    return [h for row in zip(*batches, strict=True) for h in row][:count]


def onchain_phase(
    wrk: str, chain: AnvilChain, url: str, keys: list[str], seconds: float, warmup: float,
    lanes: int, workdir: Path, pids: dict[str, int], scheme: str = "exact",
    each: int = PRICE_ATOMIC,
) -> dict[str, Any]:  # fmt: skip
    """wrk -t1 -c`lanes` with one pre-signed `exact` (or `upto`) payment per request against
    `url`; the operator's USDC shows what settled on chain (`each` atomic units a request).
    The rate is first measured in the warm-up, so that the run has enough payments but not
    many more (signing costs the bench time)."""
    challenge = httpx.get(url, timeout=30)
    if challenge.status_code != 402 or "payment-required" not in challenge.headers:
        raise SystemExit(f"bench: {url} did not answer 402: {challenge.status_code}")
    required = challenge.headers["payment-required"]
    payee = operator(chain).address
    before = chain.balance_of(payee)
    warm_count = lanes * 8
    warm = workdir / f"exact-warm-{time.monotonic_ns()}"
    warm.with_suffix(".0").write_text(
        "\n".join(sign_exact(required, chain, keys, warm_count, scheme))
    )
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
    run.with_suffix(".0").write_text("\n".join(sign_exact(required, chain, keys, count, scheme)))
    args = (str(run), "PAYMENT-SIGNATURE")
    meter = CpuMeter(pids)
    figures = run_wrk(wrk, url, seconds, lanes, 1, "paid.lua", args, ONCHAIN_TIMEOUT)
    figures["cpu_us_per_request"] = meter.per_request(figures["ok"])
    time.sleep(2)  # settles still in flight when wrk hung up
    settled = (chain.balance_of(payee) - before) // each
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
      (11u) wrk -t1 -c16: x402 `upto` on the metered route, the units used settled on
           chain per request at the response
      (12) wrk -t1 -c16: the official FastAPI middleware + the official facilitator as
           the official package's example runs it (bench/reference_facilitator.py), the
           reference a seller would otherwise pick
      (12p) wrk -t1 -c16: the official middleware + `x402 facilitator serve`, so that the
           facilitator's share and the gateway's are each visible
    """
    chain_tools()
    phases, lanes = results["phases"], LANES
    keys = [Account.create().key.hex() for _ in range(lanes)]  # one EVM payer per connection
    mint = {Account.from_key(key).address: PAYER_USDC for key in keys}
    expect = phases["4 sidecar paid direct"]["ok_rps"] * 1.5  # to size the pre-signing
    with tempfile.TemporaryDirectory(prefix="x402-bench-") as tmp, AnvilChain(mint=mint) as chain:
        workdir = Path(tmp)
        # Its URL now, started below; /verify in processes of their own, one per core.
        facilitator = FacilitatorProcess(chain, workdir, verify_processes=os.cpu_count() or 1)
        settings = exact_settings(chain, facilitator, exact_max_timeout_seconds=EXACT_TIMEOUT)
        stack = Stack(
            ROUTES,
            settings={"max_direct_ttl_seconds": 3600, **settings},
            workers=args.workers,
            envoy_concurrency=args.envoy_concurrency,
        )
        official_port, project_port, reference_port = free_port(), free_port(), free_port()
        servers: list[Process] = []
        try:
            facilitator.start()
            reference = reference_facilitator(chain, workdir, reference_port)
            servers.append(reference)
            # The official servers boot (imports) while the sidecar's stack starts.
            for port, url, name in (
                (official_port, f"http://{LOOPBACK}:{reference_port}", "official"),
                (project_port, facilitator.url, "official_project"),
            ):
                argv = official_argv(chain, url, port, args.workers)
                servers.append(Process(name, argv, workdir / f"{name}.log").start())
            write_bench_files(stack)
            stack.start_redis()
            stack.start_envoy()
            stack.start_sidecar()
            wait_http(f"http://{LOOPBACK}:{reference_port}/health", timeout=120, process=reference)
            for port, server in ((official_port, servers[1]), (project_port, servers[2])):
                wait_http(f"http://{LOOPBACK}:{port}/health", timeout=120, process=server)
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
            phases[PAID_C16] = paid_c16(wrk, args, stack, wallets, expect, "16")
            show(PAID_C16, phases[PAID_C16])

            # (11) and (12): every paid request settles on chain through the facilitator.
            official_urls = {
                OFFICIAL_C16: (f"http://{LOOPBACK}:{official_port}{official.PATH}", servers[:2]),
                OFFICIAL_PROJECT_C16: (f"http://{LOOPBACK}:{project_port}{official.PATH}",
                                       servers[2:]),
            }  # fmt: skip
            settled_phases(wrk, args, results, (chain, facilitator, stack), keys, official_urls)

            # (10h) as (10), Envoy asking over the HTTP transport.
            restart(stack, free_port(), "http", args.workers)
            stack.start_sidecar()
            phases[PAID_C16_HTTP] = paid_c16(wrk, args, stack, wallets, expect, "16h")
            show(PAID_C16_HTTP, phases[PAID_C16_HTTP])

            # (13) the top-up's latency, durable (as configured) and then not.
            topups.topup_phases(stack, chain, keys[0], args.workers, results)
        finally:
            for server in servers:
                server.stop()
            stack.stop()
            facilitator.stop()


def reference_facilitator(chain: AnvilChain, workdir: Path, port: int) -> Process:
    """(12)'s facilitator (bench/reference_facilitator.py), with a key of its own: its nonces
    never meet `x402 facilitator serve`'s."""
    key_file = workdir / "reference.key"
    write_secret(key_file, chain.spare[-1].key + "\n")
    argv = [sys.executable, "-m", "bench.reference_facilitator", "--rpc-url", chain.rpc_url,
            "--key-file", str(key_file), "--network", chain.network,
            "--port", str(port)]  # fmt: skip
    return Process("reference_facilitator", argv, workdir / "reference.log").start()


def official_argv(chain: AnvilChain, facilitator_url: str, port: int, workers: int) -> list[str]:
    """The official x402 stack (bench/official.py), paid to the operator on this chain."""
    return [sys.executable, "-m", "bench.official", "--facilitator", facilitator_url,
            "--network", chain.network, "--asset", chain.token,
            "--asset-name", chain.token_name, "--asset-version", chain.token_version,
            "--pay-to", operator(chain).address, "--amount", str(PRICE_ATOMIC),
            "--max-timeout-seconds", str(EXACT_TIMEOUT), "--port", str(port),
            "--workers", str(workers)]  # fmt: skip


def paid_c16(
    wrk: str,
    args: argparse.Namespace,
    stack: Stack,
    wallets: list[Identity],
    expect: float,
    files: str,
) -> dict[str, Any]:
    """(10): paid direct proofs at the official stack's concurrency (wrk -t1 -c16)."""
    lanes, url = LANES, stack.url + PAID_PATH
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
    return figures


def settled_phases(
    wrk: str,
    args: argparse.Namespace,
    results: dict[str, Any],
    running: tuple[AnvilChain, FacilitatorProcess, Stack],
    keys: list[str],
    official_urls: dict[str, tuple[str, list[Process]]],
) -> None:
    """(11) the sidecar's `exact`, (12) the official stack and (12p) the official middleware
    with the project's facilitator, each payment settled on chain through a facilitator."""
    chain, facilitator, stack = running
    phases, lanes = results["phases"], LANES
    seconds = args.official_duration
    warmup = max(args.warmup, 3.0)
    assert chain.process is not None and facilitator.process is not None
    onchain = {
        "anvil": chain.process.popen.pid,
        "facilitator": facilitator.process.popen.pid,
    }
    url = stack.url + PAID_PATH
    pids = {**{n: p.popen.pid for n, p in stack.processes.items()}, **onchain}
    figures = onchain_phase(wrk, chain, url, keys, seconds, warmup, lanes, stack.dir, pids)
    figures["note"] = (
        "x402 v2 exact through Envoy and the sidecar: each request verified and "
        "settled (EIP-3009 transferWithAuthorization on anvil) by the facilitator "
        "before it passes; pre-signed by the official x402 client"
    )
    phases[EXACT_C16] = figures
    show(EXACT_C16, figures)
    phases[UPTO_C16] = upto_phase(wrk, chain, stack, keys, seconds, warmup, pids)
    show(UPTO_C16, phases[UPTO_C16])
    facilitators = {
        OFFICIAL_C16: "the official facilitator as its example runs it",
        OFFICIAL_PROJECT_C16: "`x402 facilitator serve`",
    }
    for name, (official_url, processes) in official_urls.items():
        pids = {process.name: process.popen.pid for process in processes}
        pids["anvil"] = onchain["anvil"]
        if name == OFFICIAL_PROJECT_C16:
            pids["facilitator"] = onchain["facilitator"]
        figures = onchain_phase(
            wrk, chain, official_url, keys, seconds, warmup, lanes, stack.dir, pids
        )
        figures["note"] = (
            f"the official x402 {version('x402')} FastAPI middleware under uvicorn "
            f"({args.workers} workers), {facilitators[name]}, the same chain: each request "
            "verified, served and settled on chain; pre-signed by the official client"
        )
        phases[name] = figures
        show(name, figures)


def upto_phase(
    wrk: str, chain: AnvilChain, stack: Stack, keys: list[str], seconds: float, warmup: float,
    pids: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """(11u) x402 `upto` on the metered route: each payer's USDC approved to Permit2 once,
    then each request signs the route's maximum (100 units) and settles the 37 used."""
    for key in keys:
        permit2.approve(chain.w3, chain.token, Account.from_key(key).address)
    url, used = stack.url + METERED_PATH, UNITS_USED * UNIT_PRICE_ATOMIC
    figures = onchain_phase(
        wrk, chain, url, keys, seconds, warmup, LANES, stack.dir, pids, "upto", used
    )
    figures["note"] = (
        "x402 v2 upto through Envoy and the sidecar on the metered route: a Permit2 "
        "authorization of the maximum verified at the check, the 37 units used settled "
        "on chain at the response (the response phase); pre-signed by the official x402 client"
    )
    return figures
