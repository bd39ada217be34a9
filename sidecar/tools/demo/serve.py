"""`x402 demo --serve`: the stack kept up for the user's own agent, and what a client needs
to use it (printed, and written to the --info file)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from sidecar.agent.evm import EvmKey
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.errors import X402Error
from sidecar.tools.demo.world import (
    ATLAS,
    MCP_PATH,
    MCP_TOOLS,
    ROUTES,
    SERVE_CREDIT,
    SERVE_USDC,
    OnchainStatus,
    usdc,
)
from sidecar.tools.stack import Stack


def serve_forever(
    stack: Stack,
    console: Console,
    onchain: OnchainStatus | None = None,
    info: Path | None = None,
    token: str = "",
) -> int:
    """Keep the stack up for the user's own agent until Ctrl-C or SIGTERM; with `info`,
    write what a client needs there (mode 0600), removed again on the way out; with
    `token`, the operator's dashboard is served behind it."""
    onchain = onchain or OnchainStatus(skipped="no chain configured")
    wallet = Wallet.generate()
    key_file = stack.dir / "agent.key"
    wallet.identity.save(key_file)
    asyncio.run(stack.fund(wallet.public_key, SERVE_CREDIT))
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_row("gateway", stack.url)
    table.add_row("price list", stack.url + protocol.DISCOVERY_PATH)
    table.add_row("Redis", stack.redis_url)
    table.add_row("agent wallet", f"{key_file} ({SERVE_CREDIT} USDF)")
    facts = serve_facts(stack, wallet, key_file, onchain)
    table.add_row("MCP server", f"{facts['mcp_url']} (tools: {facts['mcp_tools']})")
    serve_chain_rows(table, facts)
    if token:
        table.add_row("dashboard", stack.dashboard_url)
        table.add_row("admin token", token)
    console.print(Panel(table, title="x402 demo --serve", title_align="left", expand=False))
    console.print("Try it:", markup=False)
    console.print(
        f"  export X402_GATEWAY={stack.url} X402_WALLET_FILE={key_file} "
        f"REDIS_URL={stack.redis_url}\n"
        f"  x402 pay $X402_GATEWAY{ATLAS}\n"
        f'  x402 pay --max-amount 5 -X POST -d \'{{"topic": "agents"}}\' '
        f"$X402_GATEWAY/api/v1/agent/pay-api/atlas/deep-research\n"
        f"  x402 payer balance {wallet.public_key}\n"
        "  python - <<'EOF'\n"
        "import os, httpx\n"
        "from sidecar.agent import Wallet, X402Auth, receipt_of, refusal_of\n"
        'auth = X402Auth(Wallet.from_env(max_amount="1.00", budget="10"))\n'
        f'r = httpx.get(os.environ["X402_GATEWAY"] + "{ATLAS}", auth=auth)\n'
        "print(r.status_code, r.json(), receipt_of(r) or refusal_of(r))\n"
        "EOF",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    serve_chain_snippets(console, facts)
    console.print(
        f"Open in a browser: {facts['paywall_url']}  (the paywall page; docs/guides/humans.md)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    watched = [*stack.processes.values()]
    if onchain.onchain is not None:
        watched += onchain.onchain.processes
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        if info is not None:
            facts["processes"] = {p.name: p.popen.pid for p in watched}
            write_info(info, facts)
            console.print(f"Everything above is in {info} (JSON, mode 0600).", markup=False)
        console.print("Ctrl-C stops everything.", markup=False)
        while not stop.wait(0.5):
            dead = [p.name for p in watched if p.popen.poll() is not None]
            if dead:
                raise X402Error(f"{', '.join(dead)} exited; see the logs in {stack.dir}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if info is not None:
            with contextlib.suppress(FileNotFoundError):
                info.unlink()
    console.print("stopping…", markup=False)
    return 0


def serve_facts(
    stack: Stack, wallet: Wallet, key_file: Path, onchain: OnchainStatus
) -> dict[str, Any]:
    """What a client needs to try the gateway (the --info file); with the chain, a fresh
    EVM key holding minted USDC, also saved to a file (0600) beside the wallet."""
    facts: dict[str, Any] = {
        "gateway_url": stack.url,
        "discovery_url": stack.url + protocol.DISCOVERY_PATH,
        "redis_url": stack.redis_url,
        "asset": "USDF",
        "wallet_file": str(key_file),
        "wallet_public_key": wallet.public_key,
        "wallet_balance": SERVE_CREDIT,
        "routes": {name: dict(spec) for name, spec in ROUTES.items()},
        # A priced route a person opens in a browser: the paywall page (server/paywall.py)
        "paywall_url": stack.url + ATLAS,
        # The MCP server behind the same gateway (streamable HTTP), its tools' prices.
        "mcp_url": stack.url + MCP_PATH,
        "mcp_tools": dict(MCP_TOOLS),
    }
    running = onchain.onchain
    chain_keys = (
        "chain_rpc_url", "chain_id", "network", "token_address", "token_symbol",
        "token_decimals", "facilitator_url", "pay_to", "topup_url", "evm_private_key",
        "evm_address", "evm_key_file", "evm_balance",
    )  # fmt: skip
    facts.update(dict.fromkeys(chain_keys))
    facts["onchain_skipped"] = onchain.skipped or onchain.error or None
    if running is None:
        return facts
    chain = running.chain
    evm = EvmKey.generate()
    chain.mint(evm.address, SERVE_USDC)
    evm_file = stack.dir / "agent.evm"
    evm.save(evm_file)
    facts.update(
        {
            "chain_rpc_url": chain.rpc_url,
            "chain_id": chain.chain_id,
            "network": chain.network,
            "token_address": chain.token,
            "token_symbol": "USDC",
            "token_decimals": chain.decimals,
            "facilitator_url": running.facilitator.url,
            "pay_to": running.pay_to,
            "topup_url": stack.url + "/x402/topup",
            "evm_private_key": evm.hex,
            "evm_address": evm.address,
            "evm_key_file": str(evm_file),
            "evm_balance": usdc(SERVE_USDC),
        }
    )
    return facts


def serve_chain_rows(table: Table, facts: dict[str, Any]) -> None:
    if facts["chain_rpc_url"] is None:
        table.add_row("on-chain lanes", f"skipped: {facts['onchain_skipped']}")
        return
    table.add_row("chain RPC", f"{facts['chain_rpc_url']} (chain id {facts['chain_id']})")
    table.add_row("USDC token", f"{facts['token_address']} ({facts['token_decimals']} decimals)")
    table.add_row("facilitator", facts["facilitator_url"])
    table.add_row("operator (payTo)", facts["pay_to"])
    table.add_row("top-up route", f"POST {facts['topup_url']}")
    table.add_row("EVM key", f"{facts['evm_key_file']} ({facts['evm_balance']} USDC)")
    table.add_row("EVM address", facts["evm_address"])


def serve_chain_snippets(console: Console, facts: dict[str, Any]) -> None:
    if facts["chain_rpc_url"] is None:
        return
    console.print(
        f"  export X402_EVM_KEY_FILE={facts['evm_key_file']}\n"
        "  x402 topup --amount 5 $X402_GATEWAY   # 5 USDF of credit for the wallet, paid in USDC",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def write_info(path: Path, facts: dict[str, Any]) -> None:
    """`facts` as one JSON object in `path`, mode 0600 (it holds private keys), replaced
    atomically so a reader never sees half of it."""
    path = path.absolute()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(facts, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
