"""The sidecar's small HTTP port: discovery (/.well-known/x402), self-serve top-ups
(POST /x402/topup, where configured), self-serve channels (POST /x402/channel/open and
/close, unless turned off), /healthz, /readyz and /metrics (Prometheus).

Envoy routes /.well-known/x402, the top-up and the channel requests here without
ext_authz; probes call the rest directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.core import exact, mcp, phases, upto
from sidecar.core.decision import Gateway
from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity
from sidecar.core.pricing import Price, RouteTable
from sidecar.core.protocol import DISCOVERY_PATH, SCHEME, VERSION
from sidecar.core.vouchers import SCHEME as CHANNEL_SCHEME
from sidecar.ledger import reports
from sidecar.ledger.accounts import Ledger
from sidecar.server import handshake, metrics
from sidecar.server.authz.http_transport import reason_phrase
from sidecar.server.channel_config import ChannelTerms
from sidecar.server.envoy.contract import CHANNEL_CLOSE_PATH, CHANNEL_OPEN_PATH, TOPUP_PATH
from sidecar.server.handshake import Handshake
from sidecar.server.logs import get_logger
from sidecar.server.self_channels import SelfChannels
from sidecar.server.topup import TopupService

log = get_logger("sidecar.side_port")

Reply = tuple[int, str, bytes]  # status, content type, body
Headers = dict[str, str]
# A reply may add response headers (the top-up's PAYMENT-REQUIRED / PAYMENT-RESPONSE).
AnyReply = Reply | tuple[int, str, bytes, Headers]
Handler = Callable[[], Awaitable[Reply]]
Responder = Callable[[str, str, Headers], Awaitable[AnyReply]]
QUERY = ":query"  # the request's query string, among the headers (no header has a colon)
MAX_REQUEST_BYTES = 8192


def discovery_document(
    routes: RouteTable, gateway: Gateway, channels: ChannelTerms | None = None
) -> dict[str, Any]:
    """What an agent needs to pay without a challenge (PROTOCOL.md §6). `payee` is the
    current key's id; `keys` is the key set, the current key first, then the previous
    ones (still payees, and the keys of receipts signed before a rotation); `channels`,
    where agents open their own channels."""
    return {
        "version": VERSION,
        "payee": gateway.payee,
        "keys": [
            {
                "kid": key.kid,
                "alg": "Ed25519",
                "public_key": key.public_key,
                **_key_status(key, gateway),
            }
            for key in gateway.keys.all
        ],
        "assets": [{"asset": a.code, "decimals": a.decimals} for a in routes.assets.values()],
        "schemes": [
            SCHEME,
            CHANNEL_SCHEME,
            *([exact.SCHEME, upto.SCHEME] if gateway.exact else []),
        ],
        "routes": [
            {
                "method": r.method,
                "path": r.path,
                "price": r.price.display,
                "asset": r.price.asset.code,
                "description": r.price.description,
                **phases.describe(r.price.phase, r.price.asset),  # on_success, metered
                **(_extensions(gateway, r.name, r.method) if r.price.amount else {}),
                **_mcp_tools(r.price),
            }
            for r in routes.routes
        ],
        "max_direct_ttl_seconds": gateway.max_direct_ttl,
        **_exact_entries(gateway),
        **({"channels": channels.discovery()} if channels is not None else {}),
    }


def _extensions(gateway: Gateway, route: str, method: str) -> dict[str, Any]:
    """A priced route's x402 extensions, as its 402 declares them (bazaar, …)."""
    declared = gateway.extensions_for(route, method)
    return {"extensions": declared} if declared else {}


def _mcp_tools(price: Price) -> dict[str, Any]:
    """An MCP route's tools: each priced tool's price, and the others' (core/mcp.py)."""
    if price.mcp is None:
        return {}
    default = price.asset.to_decimal(price.mcp.default) if price.mcp.default else mcp.FREE
    return {"mcp": {"tools": price.mcp.listing(price.asset), "default": default}}


def _key_status(key: Identity, gateway: Gateway) -> dict[str, Any]:
    """`current`, or `previous` (with the end of its grace period as a payee, if set)."""
    if key is gateway.identity:
        return {"status": "current"}
    until = {"payee_until": gateway.previous_until} if gateway.previous_until else {}
    return {"status": "previous", **until}


def _exact_entries(gateway: Gateway) -> dict[str, Any]:
    """Where `exact` is configured: the tokens, where to pay, and the top-up route."""
    terms = gateway.exact
    if terms is None:
        return {}
    entries: dict[str, Any] = {
        "onchain": [
            {
                "asset": a.asset,
                "network": a.network,
                "token": a.token,
                "name": a.name,
                "version": a.version,
                "decimals": a.decimals,
            }
            for a in terms.assets.values()
        ],
        "payment_target": terms.pay_to,
        "facilitator": terms.facilitator_url,
    }
    if terms.topup:
        entries["topup"] = {
            key: terms.topup[key] for key in ("method", "path", "asset", "min", "max")
        }
    return entries


class SidePort:
    def __init__(
        self,
        routes: RouteTable,
        gateway: Gateway,
        ledger: Ledger,
        topup: TopupService | None = None,
        channels: SelfChannels | None = None,
    ) -> None:
        self.ledger = ledger
        self.topup = topup
        self.channels = channels
        self.ready = True  # flipped off first on shutdown, so probes drain traffic
        self.handshake: Handshake | None = None  # with `exact`: the facilitators' answer
        self._unreachable = ""  # why the ledger failed the last readiness probe
        terms = channels.terms if channels is not None else None
        discovery = json.dumps(discovery_document(routes, gateway, terms)).encode()

        async def well_known() -> tuple[int, str, bytes]:
            return 200, "application/json", discovery

        self.handlers: dict[str, Handler] = {
            DISCOVERY_PATH: well_known,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
        }

    async def healthz(self) -> tuple[int, str, bytes]:
        return 200, "application/json", b'{"status":"ok"}'

    async def readyz(self) -> tuple[int, str, bytes]:
        if not self.ready:
            return 503, "application/json", b'{"status":"shutting_down"}'
        if self.handshake is not None and self.handshake.state != handshake.READY:
            why = {"status": self.handshake.state, "reason": self.handshake.reason}
            return 503, "application/json", json.dumps(why).encode()
        unreachable = await self.ledger.unreachable()
        if unreachable != self._unreachable:  # a line when it changes, not per probe
            if unreachable:
                log.error("ledger.unavailable", redis_url=self.ledger.url, cause=unreachable)
            else:
                log.info("ledger.available", redis_url=self.ledger.url)
            self._unreachable = unreachable
        if unreachable:
            return 503, "application/json", b'{"status":"ledger_unavailable"}'
        if self.topup is None:
            return 200, "application/json", b'{"status":"ready"}'
        # Ready for paid checks either way; top-ups are taken only on a durable ledger.
        mode = self.topup.authorizations.durable.mode
        ready = {"status": "ready", "money_in": mode.kind, "money_in_detail": mode.detail}
        return 200, "application/json", json.dumps(ready).encode()

    async def metrics(self) -> tuple[int, str, bytes]:
        """Every worker's metrics (multiprocess files), and from Redis the settlement lag
        and the ledger's memory against its maxmemory (for an alert before it is full)."""
        from sidecar.ledger.settlement import settlement_lag

        lag = memory = None
        try:
            async with asyncio.timeout(0.5):
                lag = await settlement_lag(self.ledger)
                memory = await reports.memory(self.ledger)
        except (TimeoutError, ValueError, X402Error):  # Redis down (LedgerUnavailable): the rest
            pass
        return 200, metrics.CONTENT_TYPE, metrics.render(lag, memory)

    async def respond(self, method: str, path: str, headers: Headers) -> AnyReply:
        if path == TOPUP_PATH and self.topup is not None:
            return await self.topup.respond(method, headers.get(QUERY, ""), headers)
        if path in (CHANNEL_OPEN_PATH, CHANNEL_CLOSE_PATH) and self.channels is not None:
            return await self.channels.respond(method, path, headers)
        handler = self.handlers.get(path)
        if handler is None:
            return 404, "application/json", b'{"error":"not_found"}'
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"error":"method_not_allowed"}'
        return await handler()


BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 17\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b'{"error":"busy"}\n'
)


class SideServer:
    """A side-port listener and the connections it is answering: at most `max_connections`
    at once (worker 0 also answers checks, so a flood must not take its memory or loop);
    one more is told 503 busy without being read."""

    def __init__(self, responder: Responder, max_connections: int) -> None:
        self.responder = responder
        self.max_connections = max_connections
        self.active: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.active) >= self.max_connections:
            writer.write(BUSY)
            writer.close()
            return
        self.active.add(task)
        try:
            await self._answer(reader, writer)
        finally:
            self.active.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            path, _, headers[QUERY] = target.partition("?")
            status, kind, body, *more = await self.responder(method, path, headers)
            added = "".join(f"{k}: {v}\r\n" for extra in more for k, v in extra.items())
            writer.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{added}"
                f"Connection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            pass  # a broken or hostile client; nothing to answer

    async def drain(self, grace: float) -> None:
        """Give the answers in progress (a top-up settling on chain) `grace` seconds to go
        out; the port keeps answering meanwhile (/readyz says shutting_down)."""
        if self.active:
            await asyncio.wait(set(self.active), timeout=grace)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def start_http(
    responder: Responder, host: str, port: int, max_connections: int = 256
) -> SideServer:
    """A deliberately tiny HTTP/1.1 server: one request per connection, no request body."""
    side = SideServer(responder, max_connections)
    side.server = await asyncio.start_server(side.handle, host, port, limit=MAX_REQUEST_BYTES)
    return side
