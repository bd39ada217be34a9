"""A held route's response phase over plain HTTP/1.1, whichever the check's transport: the
same decision, a cheaper wire.

Envoy's Lua filter (server/envoy/phase_call.py) POSTs each held response to the checks'
listener (server/authz/http_transport.py routes it here by contract.PROCESS_HEADER): the
check's ext_authz metadata as META_PREFIX headers, the response's headers as
RESPONSE_PREFIX ones and its status, its body as the POST's when the filter read it whole,
and TIMEOUT_HEADER, Envoy's deadline for the call: the ledger scripts refuse past it, so a
capture Envoy already gave up on never charges. The answer is always a 200 whose headers
say what to do (SET_PREFIX, REMOVE_HEADER_LIST, REPLACE_HEADER); anything else, or no
answer in time, is the phase's failure (the filter's typed 503, never the response). A
phase is never cancelled when Envoy hangs up: it finishes (phase.Processor shields the
ledger step) and its decision line is written.

Why: a grpc.aio bidirectional stream per response cost about half of a held request's
CPU in the sidecar (docs/performance.md); one POST over a kept-alive connection, parsed by
httptools, costs a fraction, and Envoy writes it with no protobuf-to-JSON transcoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from sidecar.server.envoy.contract import (
    BODY_HEADER,
    META_PREFIX,
    REMOVE_HEADER_LIST,
    REPLACE_BODY_HEADER,
    REPLACE_HEADER,
    RESPONSE_PREFIX,
    SET_PREFIX,
    STATUS_HEADER,
    WHOLE_BODY,
)
from sidecar.server.processing.answers import Answer, Continue, Headers, Wait
from sidecar.server.processing.phase import Processor
from sidecar.server.schemes.base import unpacked

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"  # the phase fails
# The answer's header names, encoded once (every held response's answer writes them).
_SET, _REMOVE = SET_PREFIX.encode(), REMOVE_HEADER_LIST.encode()
_REPLACE_BODY, _REPLACE = b"%s: 1\r\n" % REPLACE_BODY_HEADER.encode(), REPLACE_HEADER.encode()


def _header_lines(headers: Headers) -> bytes:
    return b"".join(
        b"%s%s: %s\r\n" % (_SET, name.encode(), value.encode("latin-1")) for name, value in headers
    )


def encode(answer: Answer) -> bytes:
    """The decision as the filter's instructions: one 200 whose headers say them, with the
    replacement body when there is one."""
    body = b""
    if isinstance(answer, Continue):
        lines = _header_lines(answer.set_headers)
        if answer.remove_headers:
            lines += b"%s: %s\r\n" % (_REMOVE, ",".join(answer.remove_headers).encode())
        if answer.body is not None:
            lines += _REPLACE_BODY
            body = answer.body
    else:
        lines = b"%s: %d\r\n" % (_REPLACE, answer.status) + _header_lines(answer.headers)
        body = answer.body
    return b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n%s" % (lines, len(body), body)


def facts_of(headers: Mapping[str, str]) -> tuple[dict[str, str] | None, dict[str, str]]:
    """The check's metadata (None: it left none) and the response's headers, :status
    included, out of the call's prefixed headers."""
    meta: dict[str, str] = {}
    response: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith(META_PREFIX):
            meta[name[len(META_PREFIX) :]] = value
        elif name.startswith(RESPONSE_PREFIX):
            response[name[len(RESPONSE_PREFIX) :]] = value
    response[":status"] = headers.get(STATUS_HEADER, "")
    return (unpacked(meta) if meta else None), response


class HttpProcessor:
    """The Lua filter's calls, answered around one phase.Processor."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def answer(
        self, headers: Mapping[str, str], body: bytes, deadline: float | None
    ) -> bytes:
        """One call → the whole HTTP answer. A call without the response's status is not
        Envoy's: a 400, and the phase fails closed (the filter's 503)."""
        meta, response = facts_of(headers)
        if not response[":status"].isdigit():
            return BAD_REQUEST
        whole = headers.get(BODY_HEADER) == WHOLE_BODY
        processor = self.processor
        answer = await processor.response_headers(
            meta, response, deadline, end_of_stream=whole and not body, body_follows=whole
        )
        if isinstance(answer, Wait):
            assert meta is not None  # a Wait is a held (or MCP) response's
            waited = answer.remove_headers
            answer = await processor.response_body(meta, response, body, deadline)
            if waited and isinstance(answer, Continue):
                answer = replace(answer, remove_headers=answer.remove_headers + waited)
        return encode(answer)
