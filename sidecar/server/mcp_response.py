"""The response phase of MCP routes (server/processor.py): the tool's answer, buffered whole
by Envoy (server/envoy/filters.py MCP_PROCESSING_MODE), gets the settlement in
`result._meta["x402/payment-response"]` (x402.mcp's SettleResponse), as JSON or in its SSE
event; a tools/list result gets each priced tool's price in the tool's `_meta`.

On a route charged on success the hold is closed here, once the body says how the tool
did: a JSON-RPC error or `isError: true` releases it (nothing charged, the same payment
may come again), a result captures it. On a route charged on check the check already
charged, and its settlement came along as ext_authz metadata.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from sidecar.core import mcp_results, protocol
from sidecar.core.money import Asset
from sidecar.server.envoy import contract

Held = Callable[
    [ext_proc.ProcessingRequest, Any, Any, bool], Awaitable[ext_proc.ProcessingResponse]
]
HeadersOf = Callable[[ext_proc.HttpHeaders], dict[str, str]]

_CONTINUE_BODY = ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())
_RECEIPT_HEADER = protocol.RECEIPT_HEADERS[-1]  # payment-response


@dataclass(slots=True)
class McpStream:
    """One response's stream: the headers an MCP call's answer is waiting with."""

    headers: ext_proc.ProcessingRequest | None = None
    namespace: Any = None


def _metadata(namespace: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in namespace.fields.items()}


def _body_response(
    body: bytes | None, mutation: ext_proc.HeaderMutation | None = None
) -> ext_proc.ProcessingResponse:
    common = ext_proc.CommonResponse()
    if mutation is not None:
        common.header_mutation.CopyFrom(mutation)
    if body is not None:
        common.body_mutation.body = body
    return ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse(response=common))


class McpResponses:
    """An MCP route's answers, for one Processor."""

    def __init__(
        self, assets: Mapping[str, Asset], network: str, held: Held, headers_of: HeadersOf
    ) -> None:
        """`held`: the processor's hold closing (Processor._held); `headers_of` its reading
        of Envoy's headers."""
        self.assets, self.network = assets, network
        self.held, self.headers_of = held, headers_of

    async def headers(
        self, request: ext_proc.ProcessingRequest, namespace: Any, stream: McpStream, context: Any
    ) -> ext_proc.ProcessingResponse:
        """Hold the headers until the body: its length changes (no content-length)."""
        stream.headers, stream.namespace = request, namespace
        if request.response_headers.end_of_stream:  # no body: no JSON-RPC answer at all
            return await self.body(request, stream, context, b"")
        mutation = ext_proc.HeaderMutation(remove_headers=["content-length"])
        return ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse(
                response=ext_proc.CommonResponse(header_mutation=mutation)
            )
        )

    async def body(
        self,
        request: ext_proc.ProcessingRequest,
        stream: McpStream,
        context: Any,
        body: bytes | None = None,
    ) -> ext_proc.ProcessingResponse:
        if body is None:
            body = request.response_body.body
            if not request.response_body.end_of_stream:
                return _CONTINUE_BODY  # not buffered whole: nothing to say yet
        assert stream.headers is not None
        meta = _metadata(stream.namespace)
        headers = self.headers_of(stream.headers.response_headers)
        content_type = headers.get("content-type", "")
        if meta.get(contract.MCP) == contract.MCP_LIST:
            listing = json.loads(meta[contract.MCP_PRICES])
            edit = mcp_results.with_prices(listing["tools"], listing["default"], listing["asset"])
            return _body_response(mcp_results.rewrite(body, content_type, edit))
        if contract.HOLD in meta:
            failed = mcp_results.failed(body, content_type)
            closing = asyncio.shield(self.held(stream.headers, stream.namespace, context, failed))
            response = await closing
            if response.HasField("immediate_response"):
                return response
            mutation = response.response_headers.response.header_mutation
            settled = self._settled(mutation, meta, failed)
        else:
            mutation = ext_proc.HeaderMutation()
            settled = json.loads(meta[contract.MCP_SETTLE])
        if settled is None:
            return _body_response(None, mutation)
        edit = mcp_results.with_payment_response(settled)
        return _body_response(mcp_results.rewrite(body, content_type, edit), mutation)

    def _settled(
        self, mutation: ext_proc.HeaderMutation, meta: dict[str, str], failed: bool
    ) -> dict[str, Any] | None:
        """The SettleResponse of the receipt the hold's close signed (its header)."""
        for option in mutation.set_headers:
            if option.header.key == _RECEIPT_HEADER:
                receipt = protocol.decode_header(option.header.raw_value.decode())
                asset = self.assets[meta[contract.ASSET]]
                reason = "tool_failed" if failed else ""
                return mcp_results.settle_response(receipt, asset, self.network, reason)
        return None
