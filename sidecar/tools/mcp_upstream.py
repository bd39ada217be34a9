"""An unmodified MCP server for the demo, the tests and the bench: the official `mcp` SDK's
FastMCP over streamable HTTP (`/mcp`), with no payment code at all. The gateway in front
of it prices its tools (docs/guides/mcp.md).

Tools: `get_weather` and `deep_research` (priced in the demo), `echo` (free), `flaky`
(fails while `set_flaky(true)` says so: an `on_success` route then charges nothing),
`report` (an answer of the size asked: past the gateway's buffers).
`GET /calls` says how many times each tool ran (what reached the server), `GET /healthz`
that it is up.

    python -m sidecar.tools.mcp_upstream --port 8766 [--json] [--stateless]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from collections.abc import Awaitable, Callable
from typing import cast

from mcp.server.fastmcp import FastMCP
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

Handler = Callable[[Request], Awaitable[Response]]
MCP_PATH = "/mcp"


def server(host: str, port: int, json_response: bool = False, stateless: bool = False) -> FastMCP:
    """The FastMCP server; `json_response`: answer each POST with one JSON document
    instead of an SSE stream (both are streamable HTTP); `stateless`: no session (each
    request stands alone, as the bench sends them)."""
    app = FastMCP(
        "x402-demo-tools",
        host=host,
        port=port,
        streamable_http_path=MCP_PATH,
        json_response=json_response,
        stateless_http=stateless,
        log_level="WARNING",
    )
    calls: collections.Counter[str] = collections.Counter()
    failing = {"flaky": False}

    @app.tool()
    def get_weather(city: str) -> str:
        """Today's weather in a city."""
        calls["get_weather"] += 1
        return json.dumps({"city": city, "weather": "sunny", "celsius": 21})

    @app.tool()
    def deep_research(topic: str) -> str:
        """A long report on a topic."""
        calls["deep_research"] += 1
        return f"A report on {topic}: it is a deep subject."

    @app.tool()
    async def report(kilobytes: int, seconds: float = 0.0) -> str:
        """A report of `kilobytes` KiB (at most 4 MiB), written after `seconds` (at most 5:
        an SSE answer's headers leave first)."""
        calls["report"] += 1
        await asyncio.sleep(min(seconds, 5.0))
        return "r" * (1024 * min(kilobytes, 4096))

    @app.tool()
    def echo(text: str) -> str:
        """The text back (free)."""
        calls["echo"] += 1
        return text

    @app.tool()
    def flaky(text: str) -> str:
        """Fails while set_flaky(true) says so."""
        calls["flaky"] += 1
        if failing["flaky"]:
            raise RuntimeError("the flaky tool failed")
        return f"done: {text}"

    @app.tool()
    def set_flaky(fail: bool) -> str:
        """Whether flaky fails."""
        failing["flaky"] = fail
        return "ok"

    async def counts(_request: Request) -> Response:
        return JSONResponse(dict(calls))

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    for path, handler in (("/calls", counts), ("/healthz", healthz)):
        route = cast(Callable[[Handler], Handler], app.custom_route(path, methods=["GET"]))
        route(handler)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer JSON, not SSE")
    parser.add_argument("--stateless", action="store_true", help="no sessions")
    args = parser.parse_args()
    server(args.host, args.port, args.json, args.stateless).run(transport="streamable-http")


if __name__ == "__main__":
    main()
