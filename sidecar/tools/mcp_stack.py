"""A stack (tools/stack.py) with an unmodified MCP server: the official SDK's FastMCP over
streamable HTTP (tools/mcp_upstream.py), as the service itself (the tests, the examples,
the bench) or beside the demo's service, on the gateway's own host and port (the demo:
Envoy sends the MCP routes to it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from sidecar.tools.stack import LOOPBACK, Process, Stack, free_port, wait_http


@dataclass
class McpStack(Stack):
    json: bool = False  # the MCP server answers each POST with JSON, not an SSE stream
    beside: bool = False  # the demo's service stays; the MCP server serves the MCP routes
    stateless: bool = False  # no MCP sessions: each request stands alone (the bench)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beside:  # Endpoints.mcp_service: Envoy's MCP routes go to this port
            self.ports["mcp"] = free_port(self.taken)

    @property
    def mcp_port(self) -> int:
        return self.ports["mcp"] if self.beside else self.ports["upstream"]

    @property
    def server_url(self) -> str:
        """The MCP server itself, behind Envoy (its /calls say what reached it)."""
        return f"http://{LOOPBACK}:{self.mcp_port}"

    def start_upstream(self) -> Process:
        if self.beside:
            super().start_upstream()
        name = "mcp" if self.beside else "upstream"
        argv = [sys.executable, "-m", "sidecar.tools.mcp_upstream", "--port", str(self.mcp_port)]
        argv += ["--json"] * self.json + ["--stateless"] * self.stateless
        process = self._spawn(name, argv)
        wait_http(f"{self.server_url}/healthz", process=process)
        return process
