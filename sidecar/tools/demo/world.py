"""The demo's world: its routes and amounts, and the on-chain half (anvil with USDC and
`x402 facilitator serve`) with its bootstrap."""

from __future__ import annotations

import contextlib
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from sidecar.agent.evm import EvmKey
from sidecar.core.errors import ToolMissing, X402Error
from sidecar.core.money import to_atomic, to_decimal
from sidecar.tools.chain import AnvilChain, DevAccount, install_chain_tools, missing_chain_tools
from sidecar.tools.onchain import FacilitatorProcess, operator
from sidecar.tools.stack import LOOPBACK, Process

ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {
        "method": "GET",
        "path": "/api/v1/agent/pay-api/atlas",
        "price": "0.25",
        "description": "Atlas agent API, one call",
    },
    "trade-verify": {
        "method": "GET",
        "path": "/api/v1/trade/verify/{trade_id}",
        "price": "0.01",
        "description": "Verify one trade",
    },
    "market-signal": {
        "method": "GET",
        "path": "/api/v1/market/signal/{symbol}",
        "price": "0.0005",
        "description": "One market signal",
    },
    "atlas-deep-research": {
        "method": "POST",
        "path": "/api/v1/agent/pay-api/atlas/deep-research",
        "price": "5",
        "description": "Atlas deep research run",
    },
    # Charged for what was served (docs/protocol.md §12): a hold at the check, captured
    # at the response: usage x unit price, nothing if the service fails.
    "data-rows": {
        "method": "GET",
        "path": "/api/v1/data/rows",
        "unit": "row",
        "unit_price": "0.001",
        "max_units": 100,
        "description": "Data rows, 0.001 each",
    },
    "llm-generate": {
        "method": "POST",
        "path": "/api/v1/llm/generate",
        "unit": "token",
        "unit_price": "0.00001",
        "max_units": 4000,
        "description": "LLM generation, per token",
    },
    # An unmodified MCP server's tools (FastMCP beside the demo service), per call.
    "mcp-tools": {
        "method": "POST",
        "path": "/mcp",
        "mcp": {"tools": {"get_weather": "0.01", "deep_research": "0.25"}, "default": "free"},
        "description": "MCP tools, per call",
    },
}
MCP_PATH = "/mcp"
MCP_TOOLS = {"get_weather": "0.01", "deep_research": "0.25"}
FREE_PATH = "/api/v1/agents/discover"  # not in the price list: free
ATLAS = "/api/v1/agent/pay-api/atlas"
CREDIT = "10"
MAX_AMOUNT, BUDGET = "1.00", "0.50"
EXPECTED_BALANCE = "9.7395"  # 10 - 0.25 - 0.01 - 0.0005

# The on-chain lanes (USDF backed by the local chain's USDC, 6 decimals: 1 atomic = 1 atomic).
USDC = 1_000_000
TOPUP_MIN, TOPUP_MAX = "1", "50"
AGENT_USDC = 20 * USDC  # minted to the self-funding agent's EVM key
TOPUP_AMOUNT = "5"  # what it buys, once
TOPUP_ATOMIC = 5 * USDC
# What it then pays with prepaid proofs: 0.25 + 2 x 0.01 + 2 x 0.0005 = 0.271 USDF.
PREPAID_PATHS = [
    ATLAS,
    "/api/v1/trade/verify/T-2001",
    "/api/v1/trade/verify/T-2002",
    "/api/v1/market/signal/BTC-USD",
    "/api/v1/market/signal/ETH-USD",
]
PREPAID_SPENT = 271_000
CLIENT_USDC = 1 * USDC  # minted to the official client's key
EXACT_PRICE = 250_000  # atlas, 0.25 USDC
ROWS, ROW_PRICE, ROWS_MAXIMUM = "/api/v1/data/rows", 1_000, 100_000  # 0.001 USDC a row, 100
SERVE_CREDIT, SERVE_USDC = "100", 100 * USDC
TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")


@dataclass
class DemoChain:
    """The on-chain half of the demo, when it runs: anvil with USDC and the facilitator."""

    chain: AnvilChain
    facilitator: FacilitatorProcess

    @property
    def processes(self) -> list[Process]:
        return [p for p in (self.chain.process, self.facilitator.process) if p is not None]

    @property
    def pay_to(self) -> str:
        return operator(self.chain).address

    def balances(self, address: str) -> tuple[int, int]:
        """(the payer's, the operator's) token balance, atomic units."""
        return self.chain.balance_of(address), self.chain.balance_of(self.pay_to)


@dataclass
class OnchainStatus:
    """What became of the on-chain half: running, skipped (no npm), or failed to start."""

    onchain: DemoChain | None = None
    skipped: str = ""  # why the on-chain lanes are skipped (ToolMissing): exit status kept
    error: str = ""  # why they could not start: the demo fails
    installed: list[str] = field(default_factory=list)


def usdc(atomic: int) -> str:
    return to_decimal(atomic, 6)


def signed(atomic: int) -> str:
    return ("+" if atomic > 0 else "") + usdc(atomic)


def short(text: str, keep: int = 12) -> str:
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # captured output: wide enough that tables do not wrap
        console = Console(highlight=False, width=110)
    return console


def new_evm_account() -> DevAccount:
    """A fresh EVM key as the chain helpers take it (address, hex key)."""
    key = EvmKey.generate()
    return DevAccount(key.account.address, key.hex)


def to_atomic_usdf(amount: str) -> int:
    try:
        return to_atomic(amount, 6)
    except X402Error:
        return -1


# Where browser wallets and the official paywall page look for a local chain (viem's
# `anvil`, chain id 31337): `x402 demo --serve` puts anvil there when the port is free.
WALLET_RPC_PORT = 8545


def wallet_rpc_port() -> int:
    """WALLET_RPC_PORT if nothing listens there, else 0 (any free port)."""
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, WALLET_RPC_PORT))
        except OSError:
            return 0
    return WALLET_RPC_PORT


def start_onchain(running: contextlib.ExitStack, console: Console, port: int = 0) -> OnchainStatus:
    """anvil with USDC and `x402 facilitator serve`, stopped by `running`; the chain's tools
    are installed into the per-user cache first if they are nowhere to be found. `port`:
    anvil's (0: any free one)."""
    installed: list[str] = []
    try:
        if missing_chain_tools():
            with console.status("installing the local chain's tools (once)…") as spinner:

                def report(what: str) -> None:
                    console.print(f"[bold]installing[/bold] {what} (once)", soft_wrap=True)
                    spinner.update(f"installing {what}…")

                installed = install_chain_tools(report)
        with console.status("starting anvil with USDC and the x402 facilitator…"):
            workdir = Path(running.enter_context(tempfile.TemporaryDirectory(prefix="x402-")))
            chain = running.enter_context(AnvilChain(workdir=workdir, port=port))
            facilitator = FacilitatorProcess(chain, workdir)
            running.callback(facilitator.stop)
            facilitator.start()
    except ToolMissing as exc:
        console.print(f"[yellow]on-chain lanes skipped:[/] {exc}")
        return OnchainStatus(skipped=str(exc))
    except Exception as exc:  # reported as a failed step; the prepaid lanes still run
        console.print(f"[red]the local chain did not start:[/] {exc}", soft_wrap=True)
        return OnchainStatus(error=f"{exc.__class__.__name__}: {exc}")
    return OnchainStatus(DemoChain(chain, facilitator), installed=installed)
