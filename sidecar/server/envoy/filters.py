"""Envoy's HTTP filters in front of the service: the edge's header scrub, ext_authz over
either transport, and the response phase over gRPC (ext_proc; over HTTP: phase_call.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.server.envoy import contract
from sidecar.server.envoy.contract import EXT_AUTHZ, EXT_PROC
from sidecar.server.envoy.edge import Edge, Endpoints

TYPES = "type.googleapis.com/envoy.extensions"
# The edge's per-connection buffer (Envoy's edge-proxy guidance): a response body the
# response phase reads whole fits it.
BUFFER_LIMIT_BYTES = 32768


def exact(names: Iterable[str]) -> dict[str, Any]:
    return {"patterns": [{"exact": name} for name in names]}


def ext_authz_filter(ep: Endpoints) -> dict[str, Any]:
    """Envoy's ext_authz filter over the configured transport. Fail closed either way: no
    sidecar answer means no free pass, and a 503."""
    config: dict[str, Any] = {
        "@type": f"{TYPES}.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
    }
    if ep.transport == "http":
        config["http_service"] = http_service(ep)
        config["allowed_headers"] = exact(contract.HTTP_REQUEST_HEADERS)
    else:
        config["grpc_service"] = {
            "envoy_grpc": {"cluster_name": "x402_authz"},
            "timeout": ep.authz_timeout,
        }
        config["allowed_headers"] = exact(contract.AUTHZ_REQUEST_HEADERS)
    config["failure_mode_allow"] = False
    config["status_on_error"] = {"code": "ServiceUnavailable"}
    return {"name": EXT_AUTHZ, "typed_config": config}


def http_service(ep: Endpoints) -> dict[str, Any]:
    """ext_authz's HTTP mode (server/authz/http_transport.py): what goes to the sidecar,
    and which of its answer's headers go where."""
    host, port = ep.authz_http
    return {
        "server_uri": {
            "uri": f"http://{host}:{port}",
            "cluster": "x402_authz_http",
            "timeout": ep.authz_timeout,
        },
        "path_prefix": "",
        "authorization_request": {
            # Envoy's own deadline for the check: the sidecar's ledger scripts refuse past
            # it, so a check Envoy already answered with 503 never charges.
            "headers_to_add": [
                {"key": contract.TIMEOUT_HEADER, "value": str(ms(ep.authz_timeout))}
            ],
        },
        "authorization_response": {
            "allowed_upstream_headers": exact(contract.UPSTREAM_HEADERS),
            "allowed_client_headers": exact(contract.DENIAL_HEADERS),
            "allowed_client_headers_on_success": exact(contract.SUCCESS_HEADERS),
            "dynamic_metadata_from_headers": exact(contract.METADATA_KEYS),
        },
    }


def with_headers(http_service: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """The filter's http_service with more headers on each check."""
    request = dict(http_service["authorization_request"])
    request["headers_to_add"] = [
        *request.get("headers_to_add", []),
        *({"key": key, "value": value} for key, value in headers.items()),
    ]
    return {**http_service, "authorization_request": request}


def ms(duration: str) -> int:
    """Milliseconds of an Envoy duration string ("1s", "0.3s", "1.250s")."""
    return round(float(duration.removesuffix("s")) * 1000)


def response_phase_route(mode: Mapping[str, str]) -> dict[str, Any]:
    """Enables the ext_proc filter (disabled in the chain) on one route."""
    return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
        "@type": f"{TYPES}.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": dict(mode)},
    }}  # fmt: skip


# The response phase over gRPC is an MCP route's (a held route's goes over HTTP,
# phase_call.py): the filter's own mode sends the response's headers alone (no request
# message); each MCP route's sends its body too.
HEADERS_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}
# An MCP route charged on success: the response's body, buffered whole (up to the route's
# own buffer, contract.MCP_BUFFER_BYTES), as the hold's close depends on how the tool did
# and writes the settlement into its JSON-RPC result. A longer answer is Envoy's 500 and
# its hold goes back. One message brings the whole body, trailers or not.
MCP_HELD_MODE = {**HEADERS_MODE, "response_body_mode": "BUFFERED"}
# An MCP route charged on check: the settlement goes into an answer that fits that buffer;
# a longer one, already paid for, is served as the tool wrote it (its first part comes).
MCP_CHARGED_MODE = {**HEADERS_MODE, "response_body_mode": "BUFFERED_PARTIAL"}
# What an MCP route sends of its request's body to the check: the JSON-RPC message, at
# most MCP_BODY_BYTES (a longer one is refused 413 by Envoy, never forwarded), as bytes.
MCP_REQUEST_BODY = {
    "max_request_bytes": contract.MCP_BODY_BYTES,
    "allow_partial_message": False,
    "pack_as_bytes": True,
}


def mcp_mode(held: bool) -> dict[str, str]:
    """What an MCP route sends its response phase (`held`: charged on success)."""
    return MCP_HELD_MODE if held else MCP_CHARGED_MODE


def response_phase_filter(ep: Endpoints) -> dict[str, Any]:
    """Envoy's ext_proc filter for the response phase over gRPC (server/processing/),
    disabled unless a route enables it. Fail closed: if the sidecar cannot be asked (down,
    too slow), the client gets an error, never the response; the hold it could not capture
    expires and the ledger releases it, so nothing is charged."""
    return {
        "name": EXT_PROC,
        "disabled": True,
        "typed_config": {
            "@type": f"{TYPES}.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "x402_authz"}},
            "failure_mode_allow": False,
            "processing_mode": HEADERS_MODE,
            "message_timeout": ep.authz_timeout,
            # The hold the check placed, as ext_authz's dynamic metadata.
            "metadata_options": {"forwarding_namespaces": {"untyped": [EXT_AUTHZ]}},
            "status_on_error": {"code": "ServiceUnavailable"},
        },
    }


def early_header_mutation(edge: Edge) -> list[dict[str, Any]]:
    """Client headers removed as the request arrives, before any filter or Envoy's own
    request-id and X-Forwarded-For handling runs."""
    mutations: list[dict[str, Any]] = [
        {"remove_on_match": {"key_matcher": {"prefix": prefix, "ignore_case": True}}}
        for prefix in contract.ASSERTED_PREFIXES
    ]
    if edge.strip_method_override:
        mutations += [{"remove": name} for name in contract.METHOD_OVERRIDE_HEADERS]
    if not edge.trust_request_id:  # Envoy then generates one, even for a loopback peer
        mutations.append({"remove": contract.REQUEST_ID_HEADER})
    return [
        {
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": f"{TYPES}.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": mutations,
            },
        }
    ]
