"""`x402 demo`, the newcomer's first minute: run it as they would, check what it says."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from web3 import Web3
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header

from sidecar.agent.auth import X402Auth, receipt_of
from sidecar.agent.mcp import paying_session
from sidecar.agent.wallet import Wallet
from sidecar.core.money import to_atomic, to_decimal
from sidecar.tools import demo
from sidecar.tools.onchain import exact_client
from sidecar.tools.stack import Stack
from tests.support.demos import X402, read_until_up, serve_demo

CHECKS = [
    "price list", "free route", "agent wallet", "402 challenge", "signed proof", "paid 200",
    "verified receipt", "retry redelivered", "direct payment", "max_amount guard",
    "budget guard", "decision log", "ledger", "refund", "metered charge", "mcp tool paid",
    # the on-chain lanes
    "self-funded top-up", "prepaid from the credit", "ledger after top-up",
    "exact payment", "exact on chain", "upto payment", "upto on chain",
    "receipt proven on chain", "tampered receipt refused",
]  # fmt: skip
TX_HASH = r"0x[0-9a-f]{64}"
ERC20_BALANCE = [
    {
        "name": "balanceOf",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}],
    }
]


def test_x402_demo_exits_0_and_reports_every_step() -> None:
    result = subprocess.run(
        [X402, "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for check in CHECKS:
        assert f"✓ {check}" in out, check
    assert "✗" not in out
    # The facts it reports, in the order it shows them.
    facts = [
        "← 402 payment_required: GET /api/v1/agent/pay-api/atlas costs 0.25 USDF",
        "→ retry with X-Payment",
        "← 200 from the service",
        "✓ verified receipt — rcpt_",
        "← 200 the same receipt again",
        "GET /api/v1/trade/verify/T-1001 → 200, 1 request, paid 0.01 USDF, receipt verified",
        "refused guard max_amount: 5 USDF is more than the 1 allowed per request",
        "refused guard budget: 0.25 USDF is more than the 0.2395 left",
        '"event": "authz.decision"',
        "✓ decision log — free, payment_required, paid, redelivered, paid, paid",
        "✓ ledger — balance 9.7395 USDF",
        "GET /api/v1/data/rows?limit=37 → 500 (the service failed), charged 0 of 0.1 held",
        "✓ refund",
        "GET /api/v1/data/rows → 200, 37 rows: charged 0.037 of 0.1 USDF held",
        "POST /api/v1/llm/generate → 200, 120 tokens: charged 0.0012 of 0.04 USDF held",
        "✓ metered charge — 37 rows x 0.001 + 120 tokens x 0.00001 = 0.0382 USDF",
        # an unmodified MCP server's tool, paid by an agent through the same gateway
        "9. An agent pays an MCP tool",
        "tool get_weather    0.01",
        "tools/call get_weather → paid 0.01 USDF, receipt rcpt_",
        "✓ mcp tool paid — 0.01 USDF for one call, the tool ran once; balance 0.99",
        # (a) an EVM key alone buys credit for a fresh Ed25519 key, then pays prepaid.
        "A. An agent that funds itself",
        "top-up 5 USDF credited, transaction 0x",
        "GET /api/v1/agent/pay-api/atlas → 200, prepaid proof 0.25 USDF, ledger balance 4.75",
        "GET /api/v1/market/signal/ETH-USD → 200, prepaid proof 0.0005 USDF, ledger balance 4.729",
        "✓ self-funded top-up — one top-up, 5 USDC moved on chain (-5 agent, +5 operator)",
        "✓ prepaid from the credit — 5 requests paid with prepaid proofs, 0.271 USDF",
        "✓ ledger after top-up — balance 4.729 USDF = 5 topped up - 0.271 spent",
        # (b) the official client pays exact: the price moves on chain, nothing else.
        "B. Any x402 client pays with exact",
        "GET /api/v1/agent/pay-api/atlas → 200, paid with exact on eip155:31337",
        "transaction  0x",
        "✓ exact payment — settled on chain",
        "✓ exact on chain — payer -0.25 USDC, operator +0.25 USDC: exactly the price, 0.25",
        # (c) the official client pays a metered route with upto: what was served settles.
        "C. Any x402 wallet pays a metered route with upto",
        "GET /api/v1/data/rows?limit=37 → 200, paid with upto on eip155:31337: settled 0.037 "
        "of 0.1 USDC signed",
        "✓ upto payment — 37 rows settled on chain, 37000 atomic units",
        "✓ upto on chain — payer -0.037 USDC, operator +0.037 USDC: what was served",
        # (d) the settled receipts' roots go on chain; a receipt is proven against them.
        "D. Every receipt provable against the chain",
        "BatchAnchor  0x",
        "✓ receipt proven on chain",
        "✓ tampered receipt refused — receipt rcpt_",
        f"All {len(CHECKS)} steps behaved as expected.",
    ]
    positions = [out.find(fact) for fact in facts]
    assert -1 not in positions, [f for f, p in zip(facts, positions, strict=True) if p < 0]
    assert positions == sorted(positions)
    assert "Traceback" not in result.stderr
    # Both lanes name a mined transaction's hash; the top-up's balance table shows 20 → 15.
    assert re.search(rf"top-up 5 USDF credited, transaction {TX_HASH}, receipt rcpt_", out)
    assert re.search(rf"transaction  {TX_HASH}\n", out)
    assert re.search(r"payer +20 +15 +-5\s", out) and re.search(r"operator +0 +5 +\+5\s", out)


def test_without_npm_the_demo_runs_the_prepaid_lanes_and_says_why_not_the_chain(
    tmp_path: Path,
) -> None:
    """A machine with no chain tools anywhere and no npm: the prepaid story runs, the
    on-chain lanes are skipped with the reason, and the exit status stays 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("ANVIL", "STABLECOIN_EVM")}
    env.pop("MULTICALL3_WHEEL", None)
    env.update(
        X402_TOOLS_DIR=str(tmp_path / "no-tools"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        PATH=str(Path(sys.executable).parent),  # the venv's bin: no npm
    )
    result = subprocess.run(
        [X402, "demo"], capture_output=True, text=True, timeout=120, check=False, env=env
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "on-chain lanes skipped: npm not found" in out
    assert "On-chain lanes skipped: npm not found" in out
    assert f"All {CHECKS.index('mcp tool paid') + 1} steps behaved as expected." in out
    assert "The on-chain lanes were skipped: npm not found" in out
    assert "A. An agent that funds itself" not in out and "✗" not in out
    assert not (tmp_path / "cache" / "x402-sidecar" / "tools" / "node_modules").exists()


def test_the_demo_exits_non_zero_when_a_step_misbehaves() -> None:
    # The same story against a gateway that prices the atlas call differently.
    routes = {**demo.ROUTES, "atlas": {**demo.ROUTES["atlas"], "price": "0.30"}}
    out = io.StringIO()
    with Stack(routes) as stack:
        status = demo.Demo(stack, Console(file=out, width=110)).run()
    assert status == 1
    text = out.getvalue()
    assert "✗ 402 challenge" in text and "✗ ledger" in text
    assert "✓ retry redelivered" in text  # the other steps still ran
    assert "steps misbehaved" in text


def test_x402_demo_serve_keeps_the_stack_up_and_stops_cleanly_on_ctrl_c() -> None:
    process = serve_demo()
    try:
        text = read_until_up(process)
        gateway = re.search(r"X402_GATEWAY=(\S+)", text)
        key_file = re.search(r"X402_WALLET_FILE=(\S+)", text)
        redis = re.search(r"REDIS_URL=(redis://\S+)", text)
        assert gateway and key_file and redis, text
        assert "x402 pay $X402_GATEWAY/api/v1/agent/pay-api/atlas" in text
        assert "X402Auth(Wallet.from_env(" in text

        wallet = Wallet.from_file(key_file.group(1))
        with httpx.Client(auth=X402Auth(wallet, strict=True)) as client:
            response = client.get(f"{gateway.group(1)}/api/v1/agent/pay-api/atlas")
        receipt = receipt_of(response)
        assert response.status_code == 200 and receipt is not None and receipt.verified
        assert receipt.balance == "99.75"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        host, port = gateway.group(1).removeprefix("http://").split(":")
        with socket.socket() as probe:  # Envoy is gone
            assert probe.connect_ex((host, int(port))) != 0
        assert not Path(key_file.group(1)).exists()  # and its temporary directory
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def onchain_balance(info: dict[str, Any], address: str) -> int:
    """A token balance read straight from the chain the info file names."""
    w3 = Web3(Web3.HTTPProvider(info["chain_rpc_url"]))
    token = w3.eth.contract(address=info["token_address"], abi=ERC20_BALANCE)
    balance: int = token.functions.balanceOf(Web3.to_checksum_address(address)).call()
    return balance


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def process_groups() -> dict[int, int]:
    """pid → process group of every process on the machine."""
    groups = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z":
                groups[int(entry.name)] = int(fields[2])
    return groups


def test_x402_demo_serve_info_writes_what_a_client_needs_and_sigterm_stops_it(
    tmp_path: Path,
) -> None:
    info_path = tmp_path / "demo.json"
    log = (tmp_path / "demo.log").open("w")
    process = subprocess.Popen(
        [X402, "demo", "--serve", "--info", str(info_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not info_path.exists():
            assert process.poll() is None, (tmp_path / "demo.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "demo.log").read_text()
            time.sleep(0.2)
        assert stat.S_IMODE(info_path.stat().st_mode) == 0o600  # it holds private keys
        info = json.loads(info_path.read_text())
        wallet_file = Path(info["wallet_file"])
        assert stat.S_IMODE(wallet_file.stat().st_mode) == 0o600
        assert info["onchain_skipped"] is None
        printed = (tmp_path / "demo.log").read_text()
        for fact in ("gateway_url", "redis_url", "chain_rpc_url", "token_address",
                     "facilitator_url", "evm_address", "wallet_file"):  # fmt: skip
            assert str(info[fact]) in printed, fact  # the same facts on the console
        gateway = info["gateway_url"]
        atlas = info["routes"]["atlas"]
        price = to_atomic(atlas["price"], info["token_decimals"])

        # (i) the funded Ed25519 wallet file pays a prepaid route through the SDK.
        wallet = Wallet.from_file(wallet_file)
        with httpx.Client(auth=X402Auth(wallet, strict=True), timeout=30) as client:
            prepaid = client.get(gateway + atlas["path"])
        receipt = receipt_of(prepaid)
        assert prepaid.status_code == 200 and receipt is not None and receipt.verified
        assert (receipt.payer, receipt.amount) == (wallet.public_key, atlas["price"])
        credit = to_atomic(info["wallet_balance"], info["token_decimals"])
        assert receipt.balance == to_decimal(credit - price, info["token_decimals"])

        # A person's browser gets the paywall page at the URL the demo printed.
        assert f"Open in a browser: {info['paywall_url']}" in printed
        page = httpx.get(info["paywall_url"], headers={"Accept": "text/html"}, timeout=30)
        assert page.status_code == 402 and page.headers["content-type"].startswith("text/html")
        assert "payment-required" in page.headers

        # (ii) the EVM key pays `exact` through the official client; the chain moves.
        payer, operator = info["evm_address"], info["pay_to"]
        before = onchain_balance(info, payer), onchain_balance(info, operator)
        assert before[0] == to_atomic(info["evm_balance"], info["token_decimals"]) > 0
        official = exact_client(
            info["network"], info["token_address"], info["evm_private_key"], price
        )

        async def pay() -> httpx.Response:
            async with x402HttpxClient(official, timeout=60) as http:
                answer: httpx.Response = await http.get(gateway + atlas["path"])
                return answer

        paid = asyncio.run(pay())
        assert paid.status_code == 200, paid.text
        settled = decode_payment_response_header(paid.headers["payment-response"])
        assert settled.success and re.fullmatch(TX_HASH, settled.transaction or "")
        assert settled.network == info["network"] == f"eip155:{info['chain_id']}"
        assert settled.amount == str(price)
        after = onchain_balance(info, payer), onchain_balance(info, operator)
        assert after == (before[0] - price, before[1] + price)

        # (iii) the MCP server behind the same gateway: its tools and prices, paid.
        assert info["mcp_url"] == gateway + "/mcp"
        assert info["mcp_tools"] == {"get_weather": "0.01", "deep_research": "0.25"}

        async def call_tool() -> Any:
            async with paying_session(info["mcp_url"], wallet=wallet) as tools:
                return await tools.call_tool("get_weather", {"city": "Oslo"})

        tool = asyncio.run(call_tool())
        assert tool.payment_made and tool.payment_response.success

        # SIGTERM stops everything it started, each process's own children included.
        pids = set(info["processes"].values())
        assert set(info["processes"]) == {
            "redis", "upstream", "mcp", "sidecar", "envoy", "anvil", "facilitator"
        }  # fmt: skip
        assert all(alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        leftover = {pid: group for pid, group in process_groups().items() if group in pids}
        assert leftover == {} and not any(alive(pid) for pid in pids)
        assert not info_path.exists() and not wallet_file.exists()
        assert "stopping" in (tmp_path / "demo.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_info_without_serve_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [X402, "demo", "--info", str(tmp_path / "demo.json")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--info needs --serve" in result.stderr
    assert not (tmp_path / "demo.json").exists()
