"""Envoy's ext_proc over plain HTTP/1.1 (`transport: http`): the same decision, a cheaper wire.

Envoy's ext_proc `http_service` mode POSTs each message of the phase, a ProcessingRequest as
proto JSON (bytes in base64), and reads a ProcessingResponse as JSON from a 200 answer; any
other status, a body it cannot read, or no answer within the timeout is the phase's failure
(failure_mode_allow false: the client gets Envoy's 503, never the response). It comes to the
check's listener (server/authz/http_transport.py routes it here by contract.PROCESS_HEADER),
with TIMEOUT_HEADER, Envoy's deadline for the phase: the ledger scripts refuse past it, so a
capture Envoy already gave up on never charges. A phase is never cancelled when Envoy hangs
up: it finishes (phase.Processor shields the ledger step) and its decision line is written.

Why: a grpc.aio bidirectional stream per response cost about half a worker's CPU on a held
request (docs/performance.md); a JSON POST over a kept-alive HTTP/1.1 connection, parsed
by httptools and json, costs a fraction.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from sidecar.server.envoy.contract import EXT_AUTHZ
from sidecar.server.processing.answers import Answer, Continue, Headers, Wait
from sidecar.server.processing.phase import Processor
from sidecar.server.schemes.base import unpacked

_OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"
# Every other message the filter could send continues unchanged (the processing mode sends
# only the response's headers).
_CONTINUE = {
    kind: b'{"%s":{}}' % kind.encode()
    for kind in (
        "request_headers",
        "response_headers",
        "request_body",
        "response_body",
        "request_trailers",
        "response_trailers",
    )
}


def _ok(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % len(body)
        + body
    )


BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"  # Envoy: the phase failed


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _set(headers: Headers) -> list[dict[str, Any]]:
    return [
        {"header": {"key": name, "raw_value": _b64(value.encode())}, "append_action": _OVERWRITE}
        for name, value in headers
    ]


def encode(answer: Answer) -> bytes:
    """The decision on the response's headers as ext_proc's ProcessingResponse, in proto
    JSON (no body: Envoy 1.40's http_service sends none, server/envoy/filters.py)."""
    if isinstance(answer, Continue):
        if not answer.set_headers and not answer.remove_headers:
            return _CONTINUE["response_headers"]
        mutation: dict[str, Any] = {"set_headers": _set(answer.set_headers)}
        if answer.remove_headers:
            mutation["remove_headers"] = list(answer.remove_headers)
        message: dict[str, Any] = {"response_headers": {"response": {"header_mutation": mutation}}}
    else:
        message = {
            "immediate_response": {
                "status": {"code": answer.status},
                "headers": {"set_headers": _set(answer.headers)},
                "body": _b64(answer.body),
                "details": answer.details,
            }
        }
    return json.dumps(message, separators=(",", ":")).encode()


def headers_of(message: Mapping[str, Any]) -> dict[str, str]:
    """HttpHeaders in proto JSON: raw_value in base64 (or, with an old runtime flag, value)."""
    decoded: dict[str, str] = {}
    for entry in message.get("headers", {}).get("headers", ()):
        raw = entry.get("raw_value")
        value = base64.b64decode(raw).decode("utf-8", "replace") if raw else entry.get("value", "")
        decoded[str(entry["key"]).lower()] = value
    return decoded


def metadata_of(request: Mapping[str, Any]) -> dict[str, str] | None:
    """ext_authz's dynamic metadata the filter forwarded (None: the check left none)."""
    namespace = request.get("metadata_context", {}).get("filter_metadata", {}).get(EXT_AUTHZ)
    if namespace is None:
        return None
    return unpacked({key: value for key, value in namespace.items() if isinstance(value, str)})


class HttpProcessor:
    """ext_proc's http_service answers, around one phase.Processor."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def answer(self, body: bytes, deadline: float | None) -> bytes:
        """One ProcessingRequest (JSON) → the whole HTTP answer. A message that is not
        Envoy's is a 400: the phase fails closed (Envoy answers 503)."""
        try:
            request = json.loads(body)
            kind = next(key for key in _CONTINUE if key in request)
            if kind != "response_headers":
                return _ok(_CONTINUE[kind])
            meta = metadata_of(request)
            message = request["response_headers"]
            headers = headers_of(message)
            end_of_stream = message.get("end_of_stream") is True
        except (ValueError, StopIteration, TypeError, KeyError, AttributeError):
            return BAD_REQUEST
        # No body message ever comes over HTTP: a held response is captured on its headers.
        answer = await self.processor.response_headers(meta, headers, deadline, end_of_stream)
        if isinstance(answer, Wait):  # the phase needs a body this transport never brings
            return BAD_REQUEST
        return _ok(encode(answer))
