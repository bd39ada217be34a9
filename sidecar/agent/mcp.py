"""Pay an MCP server's tool calls behind an x402 gateway: the official MCP client
(PyPI `mcp`, streamable HTTP) wrapped by the official `x402.mcp` session, with a prepaid
wallet (our `prepaid-ed25519` scheme, sidecar/agent/x402_plugin.py) or any official
x402 client (`exact` on chain).

    from sidecar.agent import Wallet
    from sidecar.agent.mcp import paying_session

    async with paying_session("http://gateway/mcp", wallet=Wallet.from_env()) as tools:
        listed = await tools.list_tools()  # each priced tool's price in its _meta
        result = await tools.call_tool("get_weather", {"city": "Paris"})
        result.payment_made, result.payment_response  # the settlement, with our receipt

The first call of a priced tool gets the payment-required result; the session signs a
proof of the invoice in its offer and calls again with it in
`params._meta["x402/payment"]`. Both packages are imported only here, on first use: the
base install does not need them (`pip install x402-sidecar[evm] mcp`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from sidecar.agent.wallet import Wallet
from sidecar.agent.x402_plugin import PREPAID_NETWORK, PrepaidEd25519

if TYPE_CHECKING:
    import httpx
    from x402 import x402Client
    from x402.mcp import x402MCPSession

__all__ = ["paying_session", "prepaid_client"]


def prepaid_client(wallet: Wallet) -> x402Client:
    """An official x402 client that pays with `wallet`'s prepaid balance."""
    from x402 import x402Client

    client = x402Client()
    client.register(PREPAID_NETWORK, PrepaidEd25519(wallet))
    return client


@asynccontextmanager
async def paying_session(
    url: str,
    *,
    wallet: Wallet | None = None,
    client: x402Client | None = None,
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[x402MCPSession]:
    """An initialized MCP session to the server at `url` (streamable HTTP) whose
    `call_tool` pays priced tools: with `wallet` (prepaid) or an official x402 `client`;
    `http`: the httpx client the MCP transport uses (headers, timeouts)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from x402.mcp import x402MCPSession

    if client is None:
        if wallet is None:
            raise ValueError("paying_session needs a wallet or an x402 client")
        client = prepaid_client(wallet)
    async with (
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        paying = x402MCPSession(session, client)
        await paying.initialize()
        yield paying
