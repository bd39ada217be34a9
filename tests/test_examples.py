"""The programs in examples/, each run as a user runs it (a subprocess), in short mode,
against a world this test started: what each reports must be what the ledgers and the
chain say."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lanes

from sidecar.core import bundles
from sidecar.core.money import to_atomic, to_decimal

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def atomic(amount: str) -> int:
    return to_atomic(amount, lanes.DECIMALS)


def run_example(name: str, world: lanes.World, tmp: Path) -> dict[str, Any]:
    """Run examples/NAME.py --short against `world`; its last line, the figures."""
    info = tmp / "world.json"
    world.save(info)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--info", str(info), "--short"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp,  # what an example writes (evidence bundles) stays in the test's directory
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def test_content_agent_one_wallet_three_gateways_funds_itself_on_chain(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["content"]) as world:
        agent = world.wallet()
        assert agent.evm is not None
        usdc_before = world.usdc(agent.evm.address)
        payees_before = {n: world.usdc(g.pay_to) for n, g in world.gateways.items()}
        figures = run_example("content_agent", world, tmp_path)

        assert figures["payer"] == agent.public_key and figures["evm"] == agent.evm.address
        assert set(figures["spent"]) == set(world.gateways) == {"text", "image", "voice"}
        assert len({g.key for g in world.gateways.values()}) == 3  # three operators
        bought = 0
        for name, gateway in world.gateways.items():
            credited = atomic(figures["topups"][name]["credited"])
            bought += credited
            # The operator's address received exactly the top-up, on chain.
            assert world.usdc(gateway.pay_to) - payees_before[name] == credited
            # Its ledger: credited by the top-up, debited by exactly what the agent reports.
            spent = atomic(figures["spent"][name])
            assert gateway.balance(agent.public_key) == credited - spent
            ledger_receipts = {r["receipt_id"]: r for r in gateway.receipts(agent.public_key)}
            assert set(figures["receipts"][name]) <= set(ledger_receipts)
            paid = [int(ledger_receipts[rid]["amount"]) for rid in figures["receipts"][name]]
            assert spent == sum(paid)  # the ledger's receipts hold atomic amounts
        assert usdc_before - world.usdc(agent.evm.address) == bought


def ledger_amounts(gateway: lanes.ServedGateway, payer: str) -> dict[str, int]:
    """receipt id → atomic amount charged, from the gateway's ledger."""
    return {r["receipt_id"]: int(r["amount"]) for r in gateway.receipts(payer)}


def test_per_token_then_audit_each_call_settled_on_its_own(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["per-token"]) as world:
        figures = run_example("per_token_audit", world, tmp_path)
        payer = figures["payer"]
        codegen, audit = figures["codegen"], figures["audit"]
        assert codegen["tokens"] == 120
        assert atomic(codegen["amount"]) == codegen["tokens"] * atomic(codegen["unit_price"])
        for name, call in (("codegen", codegen), ("audit", audit)):
            gateway = world.gateways[name]
            assert gateway.balance(payer) == atomic("2") - atomic(call["amount"])
            assert ledger_amounts(gateway, payer)[call["receipt"]] == atomic(call["amount"])
        assert atomic(figures["total"]) == atomic(codegen["amount"]) + atomic(audit["amount"])


def test_per_row_pipeline_pays_rows_returned_and_nothing_for_a_failed_page(
    tmp_path: Path,
) -> None:
    with lanes.start(lanes.SPECS["per-row"]) as world:
        figures = run_example("per_row_pipeline", world, tmp_path)
        data = world.gateways["data"]
        assert figures["rows"] == 60 and figures["failed_page_charged"] == "0"
        assert atomic(figures["charged"]) == 60 * atomic(figures["unit_price"])
        assert data.balance(figures["payer"]) == atomic("1") - atomic(figures["charged"])
        assert sum(ledger_amounts(data, figures["payer"]).values()) == atomic(figures["charged"])


def test_trading_bot_on_channels_spends_vouchers_and_gets_the_rest_back(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["channel"]) as world:
        figures = run_example("trading_bot", world, tmp_path)
        market = world.gateways["market"]
        requests, price = figures["requests"], atomic("0.0005")
        assert requests == 400 and figures["req_per_s"] > 0
        assert atomic(figures["spent"]) == requests * price
        assert atomic(figures["refund"]) == atomic(figures["deposited"]) - requests * price
        # Closed: the balance is the credit less exactly what the vouchers spent.
        assert market.balance(figures["payer"]) == atomic("10") - requests * price


def test_ci_scanner_stops_at_its_budget_and_pays_exactly_what_it_reports(
    tmp_path: Path,
) -> None:
    with lanes.start(lanes.SPECS["ci"]) as world:
        figures = run_example("ci_scanner", world, tmp_path)
        payer = figures["payer"]
        # 8 diffs x (0.000004 + 0.000002) fit in 0.00005; the 9th scan would not.
        assert figures["scanned"] == 8 and figures["stopped_at"] == 8
        assert atomic(figures["total"]) == 8 * atomic("0.000006") <= atomic(figures["budget"])
        for name, gateway in world.gateways.items():
            assert gateway.balance(payer) == atomic("0.001") - atomic(figures["spent"][name])
            assert len(gateway.receipts(payer)) == 8  # the refused scan reached no gateway
        assert figures["wallet_spent"] == figures["total"]


def test_compliance_exports_a_days_evidence_that_verifies_offline(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["compliance"]) as world:
        figures = run_example("compliance_export", world, tmp_path)
        api = world.gateways["api"]
        assert figures["verified"] is True and len(figures["batches"]) == 1
        # The bundle holds every receipt of the day, and they add up to what was debited.
        assert figures["receipts"] == [r["receipt_id"] for r in api.receipts(figures["payer"])]
        assert (
            atomic(figures["total"])
            == atomic("0.28")
            == atomic("5") - api.balance(figures["payer"])
        )
        document = json.loads(Path(figures["bundle"]).read_text())
        verdict = bundles.verify_bundle(document, bundles.parse_public_key(api.key))
        assert verdict.ok and verdict.receipts == 4, verdict.problems
        # One altered amount and the offline check names it.
        document["receipts"][0]["receipt"]["amount"] = "0.01"
        assert not bundles.verify_bundle(document, bundles.parse_public_key(api.key)).ok


def test_swarm_coordinator_chained_calls_roll_up_per_provider(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["swarm"]) as world:
        figures = run_example("swarm_coordinator", world, tmp_path)
        payer, below = figures["payer"], {"research": "search", "writer": "llm"}
        below["reviewer"] = "search"
        assert figures["paid"] == {"research": "0.02", "writer": "0.05", "reviewer": "0.01"}
        assert atomic(figures["total"]) == atomic("0.08")
        for name, paid in figures["paid"].items():
            rollup = figures["rollup"][name]
            # The coordinator's credit at the specialist's gateway went down by what it paid.
            assert world.gateways[name].balance(payer) == atomic("1") - atomic(paid)
            assert rollup["revenue"] == paid
            # The specialist paid its own API below with its own key, once per task.
            specialist = world.specialists[name]
            spent = atomic("1") - world.gateways[below[name]].balance(specialist)
            assert spent == atomic(rollup["paid_below"]) > 0
            assert atomic(rollup["net"]) == atomic(paid) - spent
            # The operator's dashboard (its JSON API) shows the same revenue.
            assert atomic(figures["dashboard"][name]) == atomic(paid)


def test_the_readme_links_every_example_on_one_line() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    harness = {"lanes.py", "specialist.py"}  # beside the programs, not one of them
    programs = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in harness)
    assert len(programs) == 8
    for program in programs:
        lines = [line for line in readme.splitlines() if f"(examples/{program})" in line]
        assert len(lines) == 1 and lines[0].startswith(f"- [examples/{program}]"), program


def test_x402_demo_lane_narrates_one_lane_and_names_the_lanes() -> None:
    x402 = str(Path(sys.executable).with_name("x402"))
    done = subprocess.run(
        [x402, "demo", "--lane", "per-row"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "x402 demo --lane per-row" in out and "Lane 5: an ML pipeline paying per row" in out
    assert "page 1: 500 from the service, charged 0" in out
    assert '"rows": 800' in out and '"charged": "0.8"' in out
    assert "✓ lane per-row ran" in out
    wrong = subprocess.run([x402, "demo", "--lane", "nope"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "one of content, per-token, swarm" in wrong.stderr
    assert set(lanes.EXAMPLES) == set(lanes.SPECS) - {"guides"}
    assert all((EXAMPLES / program).is_file() for program in lanes.EXAMPLES.values())


def test_an_example_runs_against_x402_demo_serve_info(tmp_path: Path) -> None:
    info = tmp_path / "demo.json"
    x402 = str(Path(sys.executable).with_name("x402"))
    demo = subprocess.Popen(
        [x402, "demo", "--serve", "--info", str(info)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not info.exists():
            assert demo.poll() is None and time.monotonic() < deadline, "no --info file"
            time.sleep(0.2)
        world = lanes.World.load(info, lanes.SPECS["per-row"])
        data, payer = world.gateways["data"], world.wallet().public_key
        before = data.balance(payer)
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "per_row_pipeline.py"), "--info", str(info)],
            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert figures["payer"] == payer and figures["rows"] == 800
        assert before - data.balance(payer) == atomic(figures["charged"]) == atomic("0.8")
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=30)


def test_mcp_agent_pays_an_unmodified_mcp_servers_tools(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["mcp"]) as world:
        gateway = world.gateways["api"]
        payer = world.wallet().public_key
        before = gateway.balance(payer)
        figures = run_example("mcp_agent", world, tmp_path)

        assert figures["payer"] == payer
        assert figures["prices"]["get_weather"] == "0.01"
        assert figures["prices"]["echo"] == "free" and figures["free_paid"] is False
        assert figures["spent"] == "0.01" == to_decimal(before - gateway.balance(payer), 6)
        assert [r["receipt_id"] for r in gateway.receipts(payer)] == figures["receipts"]
