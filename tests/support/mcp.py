"""MCP over raw HTTP, for the tests that send what no MCP client would (bad bodies, replayed
payments): a streamable-HTTP session with the FastMCP server behind a stack's Envoy."""

from __future__ import annotations

import json
from typing import Any

import httpx

from sidecar.tools.mcp_stack import McpStack
from sidecar.tools.stack import Stack

ACCEPT_BOTH = "application/json, text/event-stream"
PROTOCOL = "2025-06-18"


def messages(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer: one JSON document, or an SSE stream's data."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [
            json.loads(line[5:])
            for line in response.text.splitlines()
            if line.startswith("data:") and line[5:].strip()
        ]
    return [response.json()]


class RawMcp:
    """One initialized MCP session, through the gateway."""

    def __init__(self, stack: Stack, http: httpx.AsyncClient) -> None:
        self.stack, self.http = stack, http
        self.session: str | None = None
        self.ids = 0

    async def post(
        self, body: bytes | dict[str, Any] | list[Any], accept: str = ACCEPT_BOTH
    ) -> httpx.Response:
        headers = {"accept": accept, "content-type": "application/json"}
        if self.session is not None:
            headers["mcp-session-id"] = self.session
            headers["mcp-protocol-version"] = PROTOCOL
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(f"{self.stack.url}/mcp", content=content, headers=headers)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.ids += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.ids, "method": method}
        if params is not None:
            message["params"] = params
        return message

    async def start(self) -> RawMcp:
        init = self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        )
        answer = await self.post(init)
        assert answer.status_code == 200, answer.text
        self.session = answer.headers.get("mcp-session-id")
        note = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202, note.text
        return self

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any],
        payment: dict[str, Any] | None = None,
        accept: str = ACCEPT_BOTH,
    ) -> tuple[httpx.Response, dict[str, Any]]:
        """A tools/call and its JSON-RPC response."""
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if payment is not None:
            params["_meta"] = {"x402/payment": payment}
        response = await self.post(self.request("tools/call", params), accept)
        found = [m for m in messages(response) if "result" in m or "error" in m]
        return response, found[-1] if found else {}


def calls(stack: McpStack) -> dict[str, int]:
    """How many times each tool ran on the MCP server (what reached it)."""
    counts: dict[str, int] = httpx.get(f"{stack.server_url}/calls").json()
    return counts
