"""The bench's report: the table of every phase that ran, the ratios named after both
sides (results["ratios"]), the ledger's and the chain's reconciliation, and issue #17's
targets against this run's figures.
"""

from __future__ import annotations

from typing import Any

HTTP_PAID = "4h HTTP sidecar paid direct"
VOUCHERS, DIRECT_LANES = "9 channel vouchers, 16 lanes", "9 paid direct, 16 lanes"
PAID_C16, EXACT_C16 = "10 sidecar paid direct, c16", "11 sidecar exact on anvil, c16"
# (12) the reference: the official middleware with the official facilitator as the official
# package's example runs it; (12p) the same middleware with `x402 facilitator serve`.
OFFICIAL_C16 = "12 official x402 stack, c16"
OFFICIAL_PROJECT_C16 = "12p official middleware, project facilitator, c16"
UPTO_C16 = "11u sidecar upto metered on anvil, c16"
PAID_C16_HTTP = "10h HTTP sidecar paid direct, c16"


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
    for kind, added in results.get("mcp", {}).items():  # (14): bench/mcp.py
        print(f"{f'MCP tool call, {kind} vs free':<48}x{added['throughput_ratio']:.3f} req/s, "
              f"p50 {added['added_p50_ms']:+.2f} ms")  # fmt: skip
    onchain_report(results)
    memory_report(phases)
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


def onchain_report(results: dict[str, Any]) -> None:
    """(11) and (12) against the chain, and (10) against (12) against DESIGN.md's targets."""
    phases, ratios = results["phases"], results["ratios"]
    for name in (EXACT_C16, UPTO_C16, OFFICIAL_C16, OFFICIAL_PROJECT_C16):
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
        ("on_success >= 0.6 x on_check (gRPC)", ratios.get("grpc_on_success/grpc_on_check"), 0.6),
        ("metered >= 0.6 x on_check (gRPC)", ratios.get("grpc_metered/grpc_on_check"), 0.6),
        ("on_success >= 0.6 x on_check (HTTP)", ratios.get("http_on_success/http_on_check"), 0.6),
        ("metered >= 0.6 x on_check (HTTP)", ratios.get("http_metered/http_on_check"), 0.6),
        ("paid with the record >= 0.9 x before", ratios.get("with_record/before_record"), 0.9),
        ("sidecar paid >= 200 x official (c16)", ratios.get("sidecar_paid/official_x402"), 200),
        ("exact >= 5 x official (c16)", ratios.get("sidecar_exact/official_x402"), 5),
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


def memory_report(phases: dict[str, Any]) -> None:
    """Each part's peak RSS by the end of each phase (the sidecar: its largest worker), and
    what each paid request left in the ledger (Redis used_memory grown over the phase)."""
    print()
    for name, figures in phases.items():
        peak = figures.get("peak_rss_mb")
        if not peak:
            continue
        parts = ", ".join(f"{part} {mb:.0f}" for part, mb in peak.items())
        grown = figures.get("ledger_bytes_per_request")
        ledger = f"; ledger {grown} B/paid request" if grown is not None else ""
        print(f"memory: {name:<30} peak RSS MB: {parts}{ledger}")
    worst = max((f["peak_rss_mb"].get("sidecar", 0.0) for f in phases.values()
                 if f.get("peak_rss_mb")), default=None)  # fmt: skip
    if worst is not None:
        verdict = "met" if worst < 150 else "NOT met"
        print(f"target: {'sidecar worker peak RSS < 150 MB':<44}{verdict} ({worst:.0f} MB)")


def named_ratios(phases: dict[str, Any]) -> dict[str, float]:
    """The ratios by the names of both sides, each where both phases ran."""

    def rps(name: str) -> float:
        return float(phases[name]["ok_rps"])

    pairs = {
        "paid/allow_all": ("4 sidecar paid direct", "2 allow-all ext_authz"),
        "paid/allow_all_no_proof": ("4 sidecar paid direct", "2b allow-all, no proof header"),
        "paid/envoy_only": ("4 sidecar paid direct", "1 envoy only"),
        "allow_all/envoy_only": ("2 allow-all ext_authz", "1 envoy only"),
        "grpc_on_success/grpc_on_check": ("7 gRPC paid on_success", "4 sidecar paid direct"),
        "grpc_metered/grpc_on_check": ("8 gRPC paid metered", "4 sidecar paid direct"),
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
        "with_record/before_record": (
            "4n paid direct, with the record",
            "4r paid direct, before the record",
        ),
        "http_2_workers/1_worker": (HTTP_PAID, "4w1h HTTP paid direct, 1 worker"),
        "vouchers/paid": (VOUCHERS, DIRECT_LANES),
        "exact/paid": (EXACT_C16, PAID_C16),
        "upto_metered/exact": (UPTO_C16, EXACT_C16),
        "sidecar_upto/official_x402": (UPTO_C16, OFFICIAL_C16),
        "sidecar_paid/official_x402": (PAID_C16, OFFICIAL_C16),
        "sidecar_http_paid/official_x402": (PAID_C16_HTTP, OFFICIAL_C16),
        "sidecar_exact/official_x402": (EXACT_C16, OFFICIAL_C16),
        "official_project_facilitator/official_x402": (OFFICIAL_PROJECT_C16, OFFICIAL_C16),
        "sidecar_exact/official_project_facilitator": (EXACT_C16, OFFICIAL_PROJECT_C16),
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
    durable, off = "13 top-up, durable (WAITAOF)", "13 top-up, not durable"
    if durable in phases and off in phases:  # latency: above 1 is what durability costs
        p50 = phases[durable]["latency_ms"]["p50"] / max(phases[off]["latency_ms"]["p50"], 1e-3)
        ratios["topup_durable_p50/topup_not_durable_p50"] = round(p50, 3)
    return ratios
