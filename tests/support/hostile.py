"""A hostile x402 facilitator: a proxy in front of the project's real one (`x402 facilitator
serve` on anvil) that forwards every request, lets `/settle` really happen, and then fails
to answer it the way the field's facilitators do (PyPI `hostile-facilitator`'s cases):

- `timeout`: the answer is held past the sidecar's settle timeout;
- `502`: the answer is replaced by a proxy's 502;
- `402`: the answer is replaced by a 402 re-challenge;
- `pending`: the answer becomes the standard's non-terminal `settlement_pending` (HTTP 200,
  `success: false`, the real transaction), as a facilitator whose receipt wait failed says;
- `pass`: the real answer goes through.

The settle moved the money on chain in every case; only its answer is lost or garbled.
Runs an aiohttp server in its own thread and event loop, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from sidecar.tools.stack import LOOPBACK, free_port

MODES = ("timeout", "502", "402", "pending", "pass")
RECHALLENGE = {"x402Version": 2, "error": "payment_required", "accepts": []}


@dataclass
class HostileFacilitator:
    upstream: str  # the real facilitator's URL
    mode: str = "502"
    hold_seconds: float = 3.0  # `timeout`: how long the answer is held
    port: int = field(default_factory=free_port)
    settles: int = 0  # /settle requests forwarded (each one really settled, or tried)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            answer = await client.request(
                request.method,
                self.upstream + request.path_qs,
                content=body,
                headers={"content-type": request.headers.get("content-type", "application/json")},
            )
        if request.path != "/settle":
            return web.Response(
                status=answer.status_code, body=answer.content, content_type="application/json"
            )
        self.settles += 1
        if self.mode == "timeout":
            await asyncio.sleep(self.hold_seconds)
        elif self.mode == "502":
            return web.Response(status=502, text="bad gateway")
        elif self.mode == "402":
            return web.json_response(RECHALLENGE, status=402)
        elif self.mode == "pending":
            settled = answer.json()
            pending = {"success": False, "errorReason": "settlement_pending"}
            pending |= {k: settled[k] for k in ("transaction", "network", "payer") if k in settled}
            return web.json_response(pending)
        return web.Response(
            status=answer.status_code, body=answer.content, content_type="application/json"
        )


@dataclass
class FlakyChain:
    """A JSON-RPC proxy in front of anvil whose first `failures` reads of an authorization's
    state (`eth_call`) fail with a 502, as a provider's transient errors do."""

    upstream: str  # anvil's JSON-RPC URL
    failures: int = 0
    port: int = field(default_factory=free_port)
    failed: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if b'"eth_call"' in body and self.failed < self.failures:
            self.failed += 1
            return web.Response(status=502, text="bad gateway")
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            answer = await client.post(
                self.upstream, content=body, headers={"content-type": "application/json"}
            )
        return web.Response(
            status=answer.status_code, body=answer.content, content_type="application/json"
        )


@contextmanager
def _serving(handler: Any, port: int) -> Iterator[None]:
    """An aiohttp server for `handler` on a loopback port, in its own thread and loop."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stopping: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stopping
        stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, port).start()
        started.set()
        await stopping.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "the proxy did not start"
    try:
        yield
    finally:
        assert stopping is not None
        loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        loop.close()


@contextmanager
def hostile_facilitator(upstream: str, mode: str = "502") -> Iterator[HostileFacilitator]:
    """The hostile proxy in front of `upstream`, running until the block ends."""
    assert mode in MODES
    hostile = HostileFacilitator(upstream, mode)
    with _serving(hostile._forward, hostile.port):
        yield hostile


@contextmanager
def flaky_chain(upstream: str) -> Iterator[FlakyChain]:
    """The flaky JSON-RPC proxy in front of `upstream`, running until the block ends."""
    flaky = FlakyChain(upstream)
    with _serving(flaky._forward, flaky.port):
        yield flaky


__all__ = ["MODES", "FlakyChain", "HostileFacilitator", "flaky_chain", "hostile_facilitator"]
