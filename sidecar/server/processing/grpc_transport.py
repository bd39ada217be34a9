"""Envoy's ext_proc over gRPC, an MCP route's response phase whichever the transport
(server/envoy/filters.py; a held route's is the Lua call, http_transport.py): one grpc.aio
bidirectional stream per response, its messages answered from phase.Processor's decision.
A decision that waits for the body (phase.Wait) keeps the headers and the check's metadata
in the stream's Waiting until the body message comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3.http_status_pb2 import HttpStatus

from sidecar.server.envoy import contract
from sidecar.server.envoy.contract import EXT_AUTHZ
from sidecar.server.processing.answers import (
    CONTINUE,
    Answer,
    Continue,
    Headers,
    Immediate,
    Wait,
)
from sidecar.server.processing.phase import Processor
from sidecar.server.schemes.base import unpacked

PROCESSOR_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_CONTINUE_HEADERS = ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse())
_CONTINUE_BODY = ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())


def header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()),
        append_action=HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def headers_of(message: ext_proc.HttpHeaders) -> dict[str, str]:
    """Envoy sends header values as raw bytes (or, with an old runtime flag, as `value`)."""
    return {
        h.key.lower(): h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        for h in message.headers.headers
    }


def _set(headers: Headers) -> list[HeaderValueOption]:
    return [header(name, value) for name, value in headers]


def _common(answer: Continue | Wait) -> ext_proc.CommonResponse:
    common = ext_proc.CommonResponse()
    if isinstance(answer, Continue) and answer.set_headers:
        common.header_mutation.set_headers.extend(_set(answer.set_headers))
    if answer.remove_headers:
        common.header_mutation.remove_headers.extend(answer.remove_headers)
    if isinstance(answer, Continue) and answer.body is not None:
        common.body_mutation.body = answer.body
    return common


def message(answer: Answer | Wait, kind: str = "response_headers") -> ext_proc.ProcessingResponse:
    """The decision as ext_proc's ProcessingResponse, answering a `kind` message (the
    headers' or the body's; Envoy holds buffered headers until the body is answered, so
    an answer to the body still sets them)."""
    if isinstance(answer, Immediate):
        return ext_proc.ProcessingResponse(
            immediate_response=ext_proc.ImmediateResponse(
                status=HttpStatus(code=answer.status),
                headers=ext_proc.HeaderMutation(set_headers=_set(answer.headers)),
                body=answer.body,
                details=answer.details,
            )
        )
    if answer == CONTINUE:
        return _CONTINUE_BODY if kind == "response_body" else _CONTINUE_HEADERS
    common = _common(answer)
    if kind == "response_body":
        return ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse(response=common))
    if common.HasField("body_mutation"):  # the body of a response that had none
        common.status = ext_proc.CommonResponse.ResponseStatus.CONTINUE_AND_REPLACE
    return ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse(response=common))


@dataclass(slots=True)
class Waiting:
    """One stream's response whose decision comes with its body: its check's metadata and
    headers, kept until the body arrives; `whole`: the route's mode buffers the body whole
    (BUFFERED), so its one message is all of it even without end_of_stream (trailers
    follow)."""

    meta: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    whole: bool = False


class GrpcProcessor:
    """The ext_proc servicer of a grpc.aio server, around one phase.Processor."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self._releasing: set[asyncio.Future[None]] = set()  # unanswered holds' tasks

    def handler(self) -> grpc.GenericRpcHandler:
        process = grpc.stream_stream_rpc_method_handler(
            self.process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=ext_proc.ProcessingResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(PROCESSOR_SERVICE, {"Process": process})

    async def process(
        self, _requests: AsyncIterator[ext_proc.ProcessingRequest], context: Any
    ) -> None:
        """One stream per response: read and answer each message (context.read/write is
        cheaper in grpc.aio than an async-generator handler)."""
        waiting = Waiting()
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                await context.write(await self.respond(request, context, waiting))
        finally:
            if waiting.meta is not None and waiting.headers is not None:
                # Ended before the body its decision waited for (the stream may be being
                # cancelled): the hold is released on a task of its own.
                task = asyncio.ensure_future(
                    self.processor.unanswered(waiting.meta, waiting.headers)
                )
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)

    async def respond(
        self,
        request: ext_proc.ProcessingRequest,
        context: Any = None,
        waiting: Waiting | None = None,
    ) -> ext_proc.ProcessingResponse:
        """One message of the stream; anything but response headers continues unchanged,
        but the body of a response whose decision waits for it (`waiting`)."""
        kind = request.WhichOneof("request")
        if kind == "response_headers":
            return await self.response_headers(request, context, waiting)
        if kind == "response_body" and waiting is not None and waiting.meta is not None:
            return await self.response_body(request, context, waiting)
        if kind in ("request_trailers", "response_trailers"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.TrailersResponse()})
        if kind in ("request_body", "response_body"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.BodyResponse()})
        return ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())

    async def response_headers(
        self, request: ext_proc.ProcessingRequest, context: Any, waiting: Waiting | None = None
    ) -> ext_proc.ProcessingResponse:
        namespace = request.metadata_context.filter_metadata.get(EXT_AUTHZ)
        meta = None
        if namespace is not None:
            meta = unpacked({key: value.string_value for key, value in namespace.fields.items()})
        headers = headers_of(request.response_headers)
        # The route's mode, as Envoy says it in the stream's first message.
        mode = request.protocol_config.response_body_mode
        answer = await self.processor.response_headers(
            meta,
            headers,
            _deadline(context),
            end_of_stream=request.response_headers.end_of_stream,
            body_follows=waiting is not None and mode != ProcessingMode.NONE,
        )
        if isinstance(answer, Wait) and waiting is not None:
            waiting.meta, waiting.headers = meta, headers
            waiting.whole = mode == ProcessingMode.BUFFERED
        return message(answer)

    async def response_body(
        self, request: ext_proc.ProcessingRequest, context: Any, waiting: Waiting
    ) -> ext_proc.ProcessingResponse:
        """The body a decision waited for (whole, or Envoy's buffer of it: not kept)."""
        part = request.response_body
        meta, headers = waiting.meta, waiting.headers
        assert meta is not None and headers is not None
        whole = part.end_of_stream or waiting.whole
        if contract.MCP in meta and not whole:
            return _CONTINUE_BODY  # its first part (paid on check): served as it is
        waiting.meta = waiting.headers = None
        body = part.body if whole else None
        answer = await self.processor.response_body(meta, headers, body, _deadline(context))
        return message(answer, "response_body")


def _deadline(context: Any) -> float | None:
    """When Envoy stops waiting for this message (time.perf_counter()); None: unknown."""
    remaining = None if context is None else context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining
