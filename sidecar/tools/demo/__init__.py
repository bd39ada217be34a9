"""`x402 demo`: the whole product on loopback, and an agent paying its way through it.

Starts a real Redis, the sidecar, the real Envoy and a small upstream (sidecar.stack),
creates and funds an agent wallet, then narrates: the price list, a 402 challenge, the
signed proof, the paid 200 with its verified receipt, a replay refused, direct payments
in one round trip, two spending guards refusing, the decision log and the ledger; then
paying for what was served: a failed call refunded and metered calls charged by usage;
and an agent paying an MCP tool of an unmodified FastMCP server behind the same gateway.
Then the two on-chain lanes, with anvil + Circle's USDC and `x402 facilitator serve`
(sidecar.tools.chain, sidecar.tools.onchain): an agent holding only an EVM key tops up a
fresh Ed25519 key and pays prepaid from the credit; an unmodified official x402 client
pays a route with `exact`. The chain's tools are installed into a per-user cache on first
use; without npm the on-chain lanes are skipped, saying so.
Exit status 0 only if every step behaved as expected (or was skipped for want of npm).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from sidecar.tools.demo.serve import serve_forever
from sidecar.tools.demo.story import Demo
from sidecar.tools.demo.world import (
    ROUTES,
    TOPUP_MAX,
    TOPUP_MIN,
    make_console,
    start_onchain,
    wallet_rpc_port,
)
from sidecar.tools.mcp_stack import McpStack
from sidecar.tools.onchain import exact_settings

__all__ = ["ROUTES", "Demo", "make_console", "run", "serve_forever"]


def run(serve: bool = False, console: Console | None = None, info: Path | None = None) -> int:
    console = console or make_console()
    # SIGTERM stops what was started, as Ctrl-C does (serve_forever takes it over); signal
    # handlers belong to the main thread.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        with contextlib.ExitStack() as running:
            # --serve: anvil where a person's browser wallet and the paywall page look
            onchain = start_onchain(running, console, wallet_rpc_port() if serve else 0)
            settings: dict[str, Any] = {}
            if onchain.onchain is not None:
                settings = exact_settings(
                    onchain.onchain.chain,
                    onchain.onchain.facilitator,
                    topup_min=TOPUP_MIN,
                    topup_max=TOPUP_MAX,
                )
            with console.status("starting Redis, the sidecar, Envoy and the demo service…"):
                stack = McpStack(ROUTES, settings=settings, beside=True)  # + FastMCP at /mcp
                token = stack.with_admin() if serve else ""  # --serve: the dashboard too
                running.enter_context(stack)
            if serve:
                return serve_forever(stack, console, onchain, info, token)
            return Demo(stack, console, onchain).run()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM during the story: everything is stopped
        console.print("interrupted", markup=False)
        return 130
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
