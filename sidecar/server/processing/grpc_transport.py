"""Envoy's ext_proc over gRPC (`transport: grpc`, the default): one grpc.aio bidirectional
stream per response, its messages answered from phase.Processor's decision."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3.http_status_pb2 import HttpStatus

from sidecar.server.envoy.contract import EXT_AUTHZ
from sidecar.server.processing.phase import Answer, Continue, Headers, Processor

PROCESSOR_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_CONTINUE_HEADERS = ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse())


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


def message(answer: Answer) -> ext_proc.ProcessingResponse:
    """The decision as ext_proc's ProcessingResponse."""
    if isinstance(answer, Continue):
        if not answer.set_headers and not answer.remove_headers:
            return _CONTINUE_HEADERS
        mutation = ext_proc.HeaderMutation(
            set_headers=_set(answer.set_headers), remove_headers=answer.remove_headers
        )
        return ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse(
                response=ext_proc.CommonResponse(header_mutation=mutation)
            )
        )
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=HttpStatus(code=answer.status),
            headers=ext_proc.HeaderMutation(set_headers=_set(answer.headers)),
            body=answer.body,
            details=answer.details,
        )
    )


class GrpcProcessor:
    """The ext_proc servicer of a grpc.aio server, around one phase.Processor."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

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
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            await context.write(await self.respond(request, context))

    async def respond(
        self, request: ext_proc.ProcessingRequest, context: Any = None
    ) -> ext_proc.ProcessingResponse:
        """One message of the stream; anything but response headers continues unchanged."""
        kind = request.WhichOneof("request")
        if kind == "response_headers":
            return await self.response_headers(request, context)
        if kind in ("request_trailers", "response_trailers"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.TrailersResponse()})
        if kind in ("request_body", "response_body"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.BodyResponse()})
        return ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())

    async def response_headers(
        self, request: ext_proc.ProcessingRequest, context: Any
    ) -> ext_proc.ProcessingResponse:
        namespace = request.metadata_context.filter_metadata.get(EXT_AUTHZ)
        meta = None
        if namespace is not None:
            meta = {key: value.string_value for key, value in namespace.fields.items()}
        remaining = None if context is None else context.time_remaining()
        deadline = None if remaining is None else time.perf_counter() + remaining
        answer = await self.processor.response_headers(
            meta, headers_of(request.response_headers), deadline
        )
        return message(answer)
