"""Envoy's local replies: its own failures in the JSON envelope of docs/protocol.md §5, and
the sidecar's denials left as the sidecar wrote them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sidecar.server.envoy import browser
from sidecar.server.envoy.contract import (
    ANSWERED_MARK,
    DENIAL_METADATA_KEY,
    EXT_AUTHZ,
    PHASE_UNAVAILABLE,
    PHASE_UNAVAILABLE_MESSAGE,
    UNAVAILABLE_MARK,
)


def _reply(
    filter_: dict[str, Any],
    reason: str,
    message: str,
    status: int | None = None,
    retry: bool = False,
    details: bool = False,
) -> dict[str, Any]:
    """A mapper: Envoy's local reply → `{"error": reason, "message": ...}` (+ `details`,
    Envoy's response code details such as http1.codec_error)."""
    mapper: dict[str, Any] = {"filter": filter_}
    if status is not None:
        mapper["status_code"] = status
    headers = [("cache-control", "no-store")] + ([("retry-after", "1")] if retry else [])
    mapper["headers_to_add"] = [
        {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for key, value in headers
    ]
    mapper["body_format_override"] = {
        "json_format": {
            "error": reason,
            "message": message,
            **({"details": "%RESPONSE_CODE_DETAILS%"} if details else {}),
        },
        "content_type": "application/json",
    }
    return mapper


def _flags(*flags: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": list(flags)}}


def _status(code: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": code, "runtime_key": f"x402.local_reply.{code}"},
            }
        }
    }


def _denial_filter(value: dict[str, Any]) -> dict[str, Any]:
    """Matches the sidecar's denials by their ext_authz dynamic metadata mark."""
    return {
        "metadata_filter": {
            "matcher": {
                "filter": EXT_AUTHZ,
                "path": [{"key": DENIAL_METADATA_KEY}],
                "value": value,
            },
            "match_if_key_not_found": False,
        }
    }


def _phase_failed() -> dict[str, Any]:
    """Envoy's own failure of an MCP route's response phase (ext_proc: the sidecar down,
    too slow, or answering what Envoy cannot read; a held route's Lua call writes the same
    envelope itself, envoy/phase_call.py): its details start with ext_proc_error. The sidecar's
    own answers at the response carry x402_<reason> and are left as it wrote them."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                "ExpressionFilter",
                "expression": "response.code_details.startsWith('ext_proc_error')",
            },
        }
    }


def local_reply_config(origins: Iterable[str] = ()) -> dict[str, Any]:
    """The mappers, each carrying the gateway's CORS for `origins` (browser.cors_replies)."""
    return {"mappers": browser.cors_replies(mappers(), tuple(origins))}


def mappers() -> list[dict[str, Any]]:
    """Envoy's own failures in the JSON envelope of docs/protocol.md §5. The first mappers
    match the sidecar's ext_authz denials (marked with dynamic metadata) and change
    nothing, so their status, headers and body reach the client as the sidecar wrote them.
    (The overload manager's own 503 "envoy overloaded" is sent before local_reply_config is
    consulted, in Envoy 1.40: it stays plain text, so no mapper is written for it.)"""
    sidecar_denial = _denial_filter({"present_match": True})
    # Over the HTTP transport a sidecar 503 arrives as a stand-in status (a 5xx would be
    # taken for the sidecar's own failure): its status comes back, its body stays.
    unavailable = _denial_filter({"string_match": {"exact": UNAVAILABLE_MARK}})
    # ... and the gateway's own 200 (an MCP route's JSON-RPC result, a replayed response) as
    # another: its 200 comes back.
    answered = _denial_filter({"string_match": {"exact": ANSWERED_MARK}})
    return [
        {"filter": unavailable, "status_code": 503},
        {"filter": answered, "status_code": 200},
        {"filter": sidecar_denial},
        # ext_authz failed (sidecar down, timed out, refused): fail closed.
        _reply(
            _flags("UAEX"),
            "authz_unavailable",
            "the payment check is unavailable; retry shortly",
            503,
            retry=True,
        ),
        # The response phase failed (fail closed: never the response; the hold nobody
        # captured expires and the ledger releases it).
        _reply(
            _phase_failed(),
            PHASE_UNAVAILABLE,
            PHASE_UNAVAILABLE_MESSAGE,
            503,
            retry=True,
            details=True,
        ),
        _reply(_flags("UT"), "upstream_timeout", "the service did not answer in time", 504),
        _reply(
            _flags("UF", "UH", "URX", "UO", "UC", "UR"),
            "upstream_unavailable",
            "the service is unavailable; retry shortly",
            503,
            retry=True,
        ),
        _reply(_status(408), "request_timeout", "the request did not arrive in time"),
        _reply(_status(431), "headers_too_large", "the request headers are too large"),
        _reply(_status(413), "body_too_large", "the request body is too large"),
        _reply(_status(400), "bad_request", "the request is malformed", details=True),
        # Anything else Envoy answers itself keeps its status, in the same envelope.
        _reply(
            {"response_flag_filter": {}},
            "gateway_error",
            "the gateway could not serve this request",
            details=True,
        ),
    ]
