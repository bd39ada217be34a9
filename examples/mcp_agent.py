"""Lane 8: an agent buying MCP tool calls, the MCP server unmodified.

The gateway prices the tools of an MCP server (FastMCP over streamable HTTP) at the edge.
The agent connects with the official MCP client, wrapped by the official `x402.mcp`
session and paying from its prepaid wallet (sidecar.agent.mcp): `tools/list` shows each
tool's price before any call, a free tool costs nothing, a priced one is paid on the
first try and comes back with the settlement in the result's `_meta` (the gateway's
signed receipt inside it).

    python examples/mcp_agent.py
"""

from __future__ import annotations

import asyncio
from typing import Any

import lanes

from sidecar.agent.mcp import paying_session
from sidecar.core import protocol
from sidecar.core.money import to_decimal


async def buy(world: lanes.World, short: bool) -> dict[str, Any]:
    gateway = world.gateways["api"]
    wallet = world.wallet(max_amount="0.25", budget="1")
    spent, receipts = 0, []
    async with paying_session(f"{gateway.url}/mcp", wallet=wallet) as tools:
        listed = await tools.list_tools()
        prices = {
            tool.name: (tool.meta or {}).get("x402/price", {}).get("amount", "free")
            for tool in listed.tools
        }
        print("tools and prices:", prices)
        free = await tools.call_tool("echo", {"text": "hello"})
        print(f"echo (free): paid={free.payment_made}")
        calls = [("get_weather", {"city": "Paris"})]
        if not short:
            calls += [("get_weather", {"city": "Oslo"}), ("deep_research", {"topic": "x402"})]
        for name, arguments in calls:
            result = await tools.call_tool(name, arguments)
            settled = result.payment_response
            assert result.payment_made and settled is not None and not isinstance(settled, dict)
            assert settled.success and settled.extra is not None
            receipt = settled.extra["receipt"]
            assert protocol.verify_receipt(receipt, {receipt["kid"]: gateway.key})
            spent += int(settled.amount or 0)
            receipts.append(receipt["receipt_id"])
            print(f"{name}: paid {receipt['amount']} USDF, receipt {receipt['receipt_id']}")
    return {
        "lane": "mcp",
        "payer": wallet.public_key,
        "prices": prices,
        "free_paid": free.payment_made,
        "spent": to_decimal(spent, lanes.DECIMALS),
        "receipts": receipts,
    }


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    return asyncio.run(buy(world, short))


if __name__ == "__main__":
    lanes.run(lanes.SPECS["mcp"], lane)
