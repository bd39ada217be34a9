"""The response phase's answers, transport-free: each transport (grpc_transport.py,
http_transport.py) writes them its way: ext_proc's ProcessingResponse, the Lua call's
answer headers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol
from sidecar.core.decision import Denial

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Continue:
    """The service's response goes on, with these headers set (overwritten) and removed;
    `body`, when not None, replaces its body (only in the answer to a body message)."""

    set_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Immediate:
    """The service's response is replaced by this one."""

    status: int
    headers: Headers
    body: bytes
    details: str


@dataclass(frozen=True, slots=True)
class Wait:
    """The headers go on with these removed; the decision comes with the body: the
    transport keeps the headers (and the check's metadata) and hands them back with it
    (phase.Processor.response_body)."""

    remove_headers: tuple[str, ...] = ()


Answer = Continue | Immediate
CONTINUE = Continue()
WAIT = Wait()


def receipt_headers(
    receipt: Mapping[str, Any], settlement: Mapping[str, Any] | None = None
) -> Headers:
    encoded = protocol.encode_header(receipt)
    return protocol.receipt_headers(encoded, settlement)


def immediate(status: int, reason: str, message: str, denial: Denial | None = None) -> Immediate:
    """Replace the service's response: a capture that cannot happen never serves it free.
    `denial`: the check's own refusal (a 402 with its fresh challenge) to answer instead."""
    if denial is not None:
        return Immediate(status, denial.headers, denial.body, f"x402_{reason}")
    body = json.dumps({"error": reason, "message": message}).encode()
    headers: Headers = (("content-type", "application/json"), ("cache-control", "no-store"))
    if status == 503:
        headers += (("retry-after", "1"),)
    return Immediate(status, headers, body, f"x402_{reason}")
