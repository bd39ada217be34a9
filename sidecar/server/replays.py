"""A retry answered with the response it paid for (docs/protocol.md §13).

On a route with a response phase (`charge: on_success`, metered), Envoy's Lua call sends
the sidecar the response's headers and its body (when its content-length fits Envoy's
buffer, server/envoy/phase_call.py; server/processing/http_transport.py). The capture
waits for the body:
the scheme's capture records the response (`Capture.response`, encoded here) with the
payment's outcome in the same ledger script (ledger/lua/money.lua `keep_response`), for
the payment's lifetime, at most `replay_per_payer` per payer at once. A retry of that
payment is then answered by the check itself with the recorded status, headers and body
(a denied response of either transport, with the payment's receipt headers): the service
does not run again.

What is kept: the status (2xx to 4xx), the service's headers named in REPLAY_HEADERS, and
the body when it is whole, UTF-8 text (Envoy's denied body is a protobuf string) and at
most `replay_body_max_bytes`. Anything else is not kept:
the retry is redelivered instead (the service runs again, charged nothing).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol
from sidecar.server.envoy.contract import REPLAY_HEADERS

RESPONSE = "response"  # the outcome's field holding the kept response
_KEPT = frozenset(REPLAY_HEADERS)


@dataclass(frozen=True, slots=True)
class Recorded:
    """A response kept for the payment's retries."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def encode(
    status: int, headers: Iterable[tuple[str, str]], body: bytes | None, max_bytes: int
) -> str:
    """The response as the ledger keeps it ("": not kept). `body` None: not seen whole
    (larger than Envoy's buffer)."""
    if body is None or len(body) > max_bytes or not 200 <= status < 500 or not _text(body):
        return ""
    kept = [[name, value] for name, value in headers if name in _KEPT]
    record = {"status": status, "headers": kept, "body": base64.b64encode(body).decode()}
    return json.dumps(record, separators=(",", ":"))


def recorded(outcome: Mapping[str, str]) -> Recorded | None:
    """The response a payment's outcome kept, or None (its retry is redelivered)."""
    raw = outcome.get(RESPONSE)
    if not raw:
        return None
    try:
        record: Any = json.loads(raw)
        headers = tuple((str(name), str(value)) for name, value in record["headers"])
        body = base64.b64decode(record["body"], validate=True)
        return Recorded(int(record["status"]), headers, body)
    except (ValueError, KeyError, TypeError, binascii.Error):  # never ours: redeliver
        return None


def answer_headers(
    kept: Recorded, receipt: Mapping[str, Any], header: str | None,
    settlement: Mapping[str, Any] | None,
) -> list[tuple[str, str]]:  # fmt: skip
    """The replay's headers: the service's, then the payment's receipt headers."""
    encoded = header or protocol.encode_header(receipt)
    return [*kept.headers, *protocol.receipt_headers(encoded, settlement)]


def _text(body: bytes) -> bool:
    """Envoy's ext_authz denied body is a protobuf string: UTF-8 only."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
