"""The gRPC response phase's stream (server/processing/grpc_transport.py) hands the
decision a body when the route's mode says it is all there: a BUFFERED body is whole even
without end_of_stream (HTTP trailers follow it), a BUFFERED_PARTIAL one only with it."""

from __future__ import annotations

from typing import Any, cast

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from google.protobuf.struct_pb2 import Struct

from sidecar.server.envoy import contract
from sidecar.server.processing.answers import CONTINUE, Answer, Continue, Wait
from sidecar.server.processing.grpc_transport import GrpcProcessor, Waiting
from sidecar.server.processing.mcp import HELD_BACK
from sidecar.server.processing.phase import Processor


class Deciding:
    """The decision's side of the stream: waits for the body when one follows, and writes
    the settlement into what it is given."""

    def __init__(self) -> None:
        self.bodies: list[bytes | None] = []

    async def response_headers(self, *_: Any, body_follows: bool, **__: Any) -> Answer | Wait:
        return Wait(HELD_BACK) if body_follows else CONTINUE

    async def response_body(self, *facts: Any) -> Answer:
        _meta, _headers, body, _deadline = facts
        self.bodies.append(body)
        return Continue(body=b"settled:" + (body or b""))


def headers_message(mode: int) -> ext_proc.ProcessingRequest:
    request = ext_proc.ProcessingRequest()
    request.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    request.protocol_config.response_body_mode = mode
    facts = Struct()
    facts.update({contract.MCP: "call", contract.MCP_SETTLE: "{}"})
    request.metadata_context.filter_metadata[contract.EXT_AUTHZ].CopyFrom(facts)
    return request


def body_message(body: bytes, end_of_stream: bool) -> ext_proc.ProcessingRequest:
    return ext_proc.ProcessingRequest(
        response_body=ext_proc.HttpBody(body=body, end_of_stream=end_of_stream)
    )


async def exchange(mode: int, end_of_stream: bool) -> tuple[Deciding, ext_proc.ProcessingResponse]:
    deciding = Deciding()
    stream, waiting = GrpcProcessor(cast(Processor, deciding)), Waiting()
    held_back = await stream.respond(headers_message(mode), None, waiting)
    assert held_back.response_headers.response.header_mutation.remove_headers == ["content-length"]
    answer = await stream.respond(body_message(b"{}", end_of_stream), None, waiting)
    return deciding, answer


async def test_a_buffered_body_followed_by_trailers_is_whole() -> None:
    deciding, answer = await exchange(ProcessingMode.BUFFERED, end_of_stream=False)
    assert deciding.bodies == [b"{}"]
    assert answer.response_body.response.body_mutation.body == b"settled:{}"


async def test_a_buffered_body_is_whole_with_end_of_stream() -> None:
    deciding, answer = await exchange(ProcessingMode.BUFFERED, end_of_stream=True)
    assert deciding.bodies == [b"{}"]
    assert answer.response_body.response.body_mutation.body == b"settled:{}"


async def test_a_partial_body_without_end_of_stream_is_served_as_it_is() -> None:
    deciding, answer = await exchange(ProcessingMode.BUFFERED_PARTIAL, end_of_stream=False)
    assert deciding.bodies == []
    assert answer == ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())


async def test_a_partial_body_with_end_of_stream_is_whole() -> None:
    deciding, answer = await exchange(ProcessingMode.BUFFERED_PARTIAL, end_of_stream=True)
    assert deciding.bodies == [b"{}"]
    assert answer.response_body.response.body_mutation.body == b"settled:{}"
