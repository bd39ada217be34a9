"""The response phase of MCP routes (phase.py): the tool's answer, buffered by Envoy
(server/envoy/filters.py MCP_HELD_MODE, MCP_CHARGED_MODE), gets the settlement in
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
from typing import Any

from sidecar.core import mcp_results, protocol
from sidecar.core.money import Asset
from sidecar.server.envoy import contract
from sidecar.server.processing.answers import CONTINUE, Answer, Continue, Headers

# The processor's hold closing (phase.Processor._held): meta, headers, deadline, and why it
# is released whatever the status ("": it is not).
Held = Callable[[Mapping[str, str], Mapping[str, str], float | None, str], Awaitable[Answer]]
# Those reasons (the decision line's): the tool answered an error; the answer never came.
TOOL_FAILED, NOT_SERVED = "tool_failed", "not_served"

_RECEIPT_HEADER = protocol.RECEIPT_HEADERS[-1]  # payment-response
# The answer's length changes: the headers wait for the body without their content-length.
HELD_BACK = ("content-length",)


class McpResponses:
    """An MCP route's answers, for one Processor."""

    def __init__(self, assets: Mapping[str, Asset], network: str, held: Held) -> None:
        self.assets, self.network, self.held = assets, network, held

    async def body(
        self,
        meta: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        deadline: float | None,
    ) -> Answer:
        """The whole answer's body (b"": none) → the answer with the settlement in it."""
        content_type = headers.get("content-type", "")
        if meta.get(contract.MCP) == contract.MCP_LIST:
            listing = json.loads(meta[contract.MCP_PRICES])
            edit = mcp_results.with_prices(listing["tools"], listing["default"], listing["asset"])
            return Continue(body=mcp_results.rewrite(body, content_type, edit))
        answer = CONTINUE
        if contract.HOLD in meta:
            failed = mcp_results.failed(body, content_type)
            failure = TOOL_FAILED if failed else ""
            closed = await asyncio.shield(self.held(meta, headers, deadline, failure))
            if not isinstance(closed, Continue):
                return closed
            answer = closed
            settled = self._settled(answer.set_headers, meta, failed)
        else:
            settled = json.loads(meta[contract.MCP_SETTLE])
        if settled is None:
            return answer
        edit = mcp_results.with_payment_response(settled)
        rewritten = mcp_results.rewrite(body, content_type, edit)
        return Continue(answer.set_headers, answer.remove_headers, rewritten)

    def _settled(
        self, set_headers: Headers, meta: Mapping[str, str], failed: bool
    ) -> dict[str, Any] | None:
        """The SettleResponse of the receipt the hold's close signed (its header)."""
        for name, value in set_headers:
            if name == _RECEIPT_HEADER:
                receipt = protocol.decode_header(value)
                asset = self.assets[meta[contract.ASSET]]
                reason = TOOL_FAILED if failed else ""
                return mcp_results.settle_response(receipt, asset, self.network, reason)
        return None
