"""Envoy's ext_authz over plain HTTP/1.1 (`transport: http`): the same decision, a cheaper wire.

Envoy's `http_service` mode sends each check as an HTTP request: the client's method, path
and Host, the headers `allowed_headers` lets through, and `headers_to_add` (the renderer's
`x-x402-authz-timeout-ms`, Envoy's own deadline for the check). A 200 answer allows: the
headers Envoy's `allowed_upstream_headers` names go to the service, those of
`allowed_client_headers_on_success` to the client, those of `dynamic_metadata_from_headers`
become ext_authz's dynamic metadata (the access log, the response phase), and
`x-envoy-auth-headers-to-remove` strips the proof. Any other status denies: Envoy answers
the client with it, the `allowed_client_headers` and our body; but Envoy takes any 5xx for
its own failure and drops our answer, so a 503 travels as UNAVAILABLE_STAND_IN, marked, and
the renderer's local-reply mapper gives it back its 503 (server/envoy/replies.py); the
gateway's own 200 (an MCP answer, a replayed response) likewise travels as
ANSWERED_STAND_IN. There are no per-route
`context_extensions` here, so prices come from the sidecar's route table; a route's response
phase is announced by the renderer's per-route `x-x402-phase` header instead.

Why a second transport: grpc.aio costs more Python per check, before our code runs, than
all of our own work (docs/performance.md, "Two transports"); an asyncio protocol over
httptools (llhttp, the parser uvicorn uses) costs a fraction of it.
The parser is that well-kept library; only the answers are written here, from prebuilt
pieces. A check is never cancelled when Envoy hangs up: it finishes (the ledger scripts
refuse past Envoy's deadline, so a 503 never charges) and its decision line says
`cancelled`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Protocol, cast

import httptools

from sidecar.core import decision, phases, protocol
from sidecar.core.errors import ConfigError
from sidecar.server.authz.check import Facts
from sidecar.server.envoy.contract import (
    ANSWERED_MARK,
    ANSWERED_STAND_IN,
    DENIAL_METADATA,
    DENIAL_METADATA_KEY,
    EXTERNAL_ADDRESS,
    MCP_BODY_BYTES,
    PHASE_HEADER,
    PROCESS_HEADER,
    PROCESS_PATH,
    REMOVE_HEADER,
    TIMEOUT_HEADER,
    UNAVAILABLE_MARK,
    UNAVAILABLE_STAND_IN,
)

MAX_HEAD_BYTES = 65536  # Envoy caps a client's header block at max_request_headers_kb (60)
# The response phase's call: the service's response headers (Envoy caps them at its
# max_response_headers_kb, 60 by default) and the check's metadata as headers, and the body
# Envoy read (at most its 32 KiB buffer).
MAX_PROCESS_BYTES = 4 * MAX_HEAD_BYTES
_PROCESS_URL = PROCESS_PATH.encode()
# A check's route annotations: over HTTP only whether the response phase runs (read-only).
_RESPONSE_PHASE: Mapping[str, str] = MappingProxyType({phases.EXT_PHASE: phases.PHASE_RESPONSE})
_NONE: Mapping[str, str] = MappingProxyType(
    {}
)  # Envoy caps a client's header block at max_request_headers_kb (60)


def reason_phrase(status: int) -> str:
    """The status line's phrase (any phrase will do for Envoy; a known one for people)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Denied"


def _lines(headers: Iterable[tuple[str, str]]) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1")


class HttpAnswers:
    """HTTP/1.1 answers for Envoy's ext_authz `http_service` (check.Answers)."""

    _REMOVE_PROOFS = f"{REMOVE_HEADER}: {','.join(protocol.PROOF_HEADERS)}\r\n".encode()
    # A free request: the proofs and any x-x402-* assertion stripped (the edge strips them
    # too), nothing added.
    _STRIP = ",".join((*protocol.PROOF_HEADERS, *decision.UPSTREAM_HEADERS))
    free = f"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{REMOVE_HEADER}: {_STRIP}\r\n\r\n".encode()

    def ok(
        self,
        upstream: Iterable[tuple[str, str]],
        response: Iterable[tuple[str, str]],
        metadata: Mapping[str, str],
    ) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
            + self._REMOVE_PROOFS
            + _lines(upstream)
            + _lines(response)
            + _lines(metadata.items())
            + b"\r\n"
        )

    _DENIED = _lines(DENIAL_METADATA.items())  # Envoy's local-reply mappers leave it as is
    _UNAVAILABLE = _lines([(DENIAL_METADATA_KEY, UNAVAILABLE_MARK)])  # ... or restore a 503
    _ANSWERED = _lines([(DENIAL_METADATA_KEY, ANSWERED_MARK)])  # ... or a 200

    def denied(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        mark = self._DENIED
        if status >= 500:
            status, mark = UNAVAILABLE_STAND_IN, self._UNAVAILABLE
        elif status == 200:  # the gateway's own answer (an MCP route's, a replayed
            status, mark = ANSWERED_STAND_IN, self._ANSWERED  # response): 200 would allow
        return (
            f"HTTP/1.1 {status} {reason_phrase(status)}\r\ncontent-length: {len(body)}\r\n".encode()
            + _lines(headers)
            + mark
            + b"\r\n"
            + body
        )


def client_address(forwarded_for: str, trusted_hops: int) -> str:
    """The client as Envoy saw it, where Envoy set no x-envoy-external-address: with
    use_remote_address Envoy appends the peer it talks to, so the last entry is the peer,
    and each trusted proxy in front adds one more."""
    entries = [entry.strip() for entry in forwarded_for.split(",") if entry.strip()]
    if not entries:
        return ""
    return entries[max(0, len(entries) - 1 - trusted_hops)]


class Decider(Protocol):
    """What answers a check: check.CheckService (the bench's allow-all is another)."""

    async def decide(self, facts: Facts) -> bytes: ...


class Processing(Protocol):
    """What answers the response phase over HTTP: processing.http_transport.HttpProcessor."""

    async def answer(
        self, headers: Mapping[str, str], body: bytes, deadline: float | None
    ) -> bytes: ...


class _Malformed(Exception):
    """A check request that is not HTTP/1.1 as Envoy writes it."""


class AuthzConnection(asyncio.Protocol):
    """One connection from Envoy's ext_authz HTTP client (or its Lua filter's, the response
    phase: PROCESS_PATH with PROCESS_HEADER): keep-alive, one request at a time (answers go
    out in request order should Envoy ever pipeline)."""

    def __init__(
        self,
        authz: Decider,
        trusted_hops: int,
        inflight: set[asyncio.Future[None]],
        processing: Processing | None = None,
        checks: bool = True,
    ) -> None:
        self.authz, self.trusted_hops, self.inflight = authz, trusted_hops, inflight
        self.processing, self.checks = processing, checks
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.previous: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.size = 0
        self.body = bytearray()
        self.processes = False  # the response phase's message, not a check
        self.limit = MAX_HEAD_BYTES

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # checks in flight finish; their lines say `cancelled`

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, _Malformed):
            self._refuse(400, "bad_request", "the check request is not HTTP/1.1 as Envoy sends it")

    # -- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers and self.processing is not None and self.url == _PROCESS_URL:
            # The phase's call carries the response's header block and the check's metadata
            # (a client's check on this path is bounded by Envoy's 60 KiB before it).
            self.limit = MAX_PROCESS_BYTES
        self.size += len(name) + len(value)
        if self.size > self.limit:
            raise _Malformed("header block too large")
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.processes = self._processes()

    def on_body(self, body: bytes) -> None:
        # A check's: only on MCP routes (with_request_body, at most MCP_BODY_BYTES); the
        # response phase's message: at most MAX_PROCESS_BYTES.
        self.body += body
        if len(self.body) > (MAX_PROCESS_BYTES if self.processes else MCP_BODY_BYTES):
            raise _Malformed("body too large")

    def _processes(self) -> bool:
        """The response phase's message: a check never carries PROCESS_HEADER (Envoy adds
        it to the phase's requests alone; the edge strips a client's x-x402-*)."""
        return (
            self.processing is not None
            and PROCESS_HEADER in self.headers
            and self.url == _PROCESS_URL
        )

    def on_message_complete(self) -> None:
        headers = self.headers
        method = self.parser.get_method().decode("latin-1")
        timeout = headers.get(TIMEOUT_HEADER)
        deadline = None
        if timeout is not None and timeout.isdigit():
            deadline = time.perf_counter() + int(timeout) / 1000
        keep_alive = self.parser.should_keep_alive()
        if self.processing is not None and self.processes:
            answering = self.processing.answer(headers, bytes(self.body), deadline)
            self._schedule(answering, False, keep_alive)
            return
        if not self.checks:  # the gRPC transport's listener: the response phase alone
            self._refuse(404, "not_found", "this listener answers the response phase only")
            return
        extensions = (
            _RESPONSE_PHASE if headers.get(PHASE_HEADER) == phases.PHASE_RESPONSE else _NONE
        )
        path, _, query = self.url.decode("latin-1").partition("?")
        facts = Facts(
            method,
            path,
            headers.get("host", ""),
            headers.get("x-forwarded-proto", "http"),
            headers,
            extensions,
            headers.get(EXTERNAL_ADDRESS)
            or client_address(headers.get("x-forwarded-for", ""), self.trusted_hops),
            deadline,
            self.gone,
            query=query,
            body=bytes(self.body),
        )
        self._schedule(self.authz.decide(facts), method == "HEAD", keep_alive)

    def _schedule(self, answering: Awaitable[bytes], head_only: bool, keep_alive: bool) -> None:
        task = asyncio.ensure_future(self._answer(answering, head_only, keep_alive, self.previous))
        self.previous = task
        self.inflight.add(task)  # a worker drains these before it stops
        task.add_done_callback(self.inflight.discard)

    def gone(self) -> bool:
        return self.closed

    async def _answer(
        self,
        answering: Awaitable[bytes],
        head_only: bool,
        keep_alive: bool,
        previous: asyncio.Future[None] | None,
    ) -> None:
        answer = await answering
        if previous is not None and not previous.done():
            await previous
        if head_only:  # an answer to HEAD carries no body: Envoy would not read it
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
        if not keep_alive:
            transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer what cannot be parsed (Envoy then answers the client with it), then hang
        up: the connection's framing is lost."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = f'{{"error":"{reason}","message":"{message}"}}'.encode()
        headers = (("content-type", "application/json"), ("cache-control", "no-store"))
        transport.write(HttpAnswers().denied(status, headers, body))
        transport.close()


class CheckServer:
    """One worker's HTTP ext_authz listener (and response phase) and what it has in flight."""

    def __init__(
        self,
        authz: Decider,
        trusted_hops: int,
        processing: Processing | None = None,
        checks: bool = True,
    ) -> None:
        self.authz, self.trusted_hops, self.processing = authz, trusted_hops, processing
        self.checks = checks
        self.inflight: set[asyncio.Future[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                lambda: AuthzConnection(
                    self.authz, self.trusted_hops, self.inflight, self.processing, self.checks
                ),
                host,
                port,
                backlog=1024,
            )
        except OSError as exc:
            raise ConfigError(
                f"config listen_authz_http: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None

    async def drain(self, grace: float) -> None:
        """Stop taking connections; give the checks in flight `grace` seconds to answer."""
        if self.server is not None:
            self.server.close()
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=grace)


async def serve(
    authz: Decider,
    host: str,
    port: int,
    trusted_hops: int,
    processing: Processing | None = None,
    checks: bool = True,
) -> CheckServer:
    """Listen for Envoy's ext_authz checks (without `checks`: refused, the gRPC transport's)
    and, with `processing`, its response phase, on host:port."""
    server = CheckServer(authz, trusted_hops, processing, checks)
    await server.start(host, port)
    return server
