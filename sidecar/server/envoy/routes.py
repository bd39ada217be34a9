"""The virtual host's routes: discovery and the top-up (no ext_authz), a payment's preflight,
each priced route with its annotations, then the catch-all to the service.

Over the gRPC transport a priced route carries its price as ext_authz
`context_extensions`; over the HTTP transport (server/authz/http_transport.py) the sidecar prices it
from its own route table, and a route with a response phase says so with a header.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from sidecar.core import mcp, phases
from sidecar.core.pricing import ANY_METHOD, is_pattern, path_regex
from sidecar.server.envoy import browser, contract, phase_call
from sidecar.server.envoy.contract import EXT_AUTHZ, EXT_PROC
from sidecar.server.envoy.edge import Edge, Endpoints
from sidecar.server.envoy.filters import (
    MCP_REQUEST_BODY,
    TYPES,
    http_service,
    mcp_mode,
    response_phase_route,
    with_headers,
)


def seconds(value: int) -> str:
    return f"{value}s"


def _path_match(path: str) -> dict[str, Any]:
    if not is_pattern(path):  # wildcards (*, **, {param}) match as the sidecar's regex
        return {"path": path}
    return {"safe_regex": {"regex": path_regex(path)}}


def _route_match(spec: Mapping[str, Any]) -> dict[str, Any]:
    match = _path_match(str(spec["path"]))
    method = str(spec.get("method", ANY_METHOD)).upper()
    if method == "GET":  # HEAD runs the GET handler: the sidecar prices it as GET
        methods: dict[str, Any] = {"safe_regex": {"regex": "GET|HEAD"}}
        match["headers"] = [{"name": ":method", "string_match": methods}]
    elif method != ANY_METHOD:
        match["headers"] = [{"name": ":method", "string_match": {"exact": method}}]
    return match


def route_extensions(name: str, spec: Mapping[str, Any], default_asset: str) -> dict[str, str]:
    """A priced route's ext_authz context_extensions: its name, price, asset and
    description, and its response phase's annotations."""
    extensions = {contract.EXT_ROUTE: name}
    if "price" in spec:  # a metered route is priced by its unit price (phase annotations)
        extensions[contract.EXT_PRICE] = str(spec["price"])
    extensions[contract.EXT_ASSET] = str(spec.get("asset", default_asset))
    if spec.get("description"):
        extensions[contract.EXT_DESCRIPTION] = str(spec["description"])
    extensions.update(phases.spec_annotations(spec))
    extensions.update(mcp.spec_annotations(spec))
    return extensions


def priced_route(
    name: str,
    spec: Mapping[str, Any],
    default_asset: str,
    edge: Edge | None = None,
    http_service: Mapping[str, Any] | None = None,
    mcp_cluster: str = "service",
) -> dict[str, Any]:
    """An Envoy route for a priced route. Over gRPC its price rides along as
    context_extensions; over HTTP (`http_service`: the filter's) there are none, and a
    route with a response phase says so with a header on its checks instead. A held
    route's response phase is the Lua filter's call (phase_call.py), an MCP route's
    ext_proc over gRPC, whichever the check's transport. An MCP route goes to
    `mcp_cluster` (an MCP server beside the service, in the demo)."""
    phase = phases.spec_annotations(spec)
    edge = edge or Edge()
    check_settings: dict[str, Any] = {
        "context_extensions": route_extensions(name, spec, default_asset)
    }
    if http_service is not None:
        check_settings = {}
        if phase:
            check_settings["http_service"] = with_headers(
                http_service, {contract.PHASE_HEADER: contract.PHASE_RESPONSE}
            )
    is_mcp = mcp.ROUTE_KEY in spec
    if is_mcp:  # the check reads the JSON-RPC body (bounded: a longer one is Envoy's 413)
        check_settings["with_request_body"] = MCP_REQUEST_BODY
    config: dict[str, Any] = {}
    if check_settings:
        config[EXT_AUTHZ] = {
            "@type": f"{TYPES}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": check_settings,
        }
    if phase and not is_mcp:  # the phase over HTTP (a held route), on this route alone
        config.update(phase_call.route_configs())
    elif is_mcp:  # over gRPC (ext_proc), on this route alone
        config[EXT_PROC] = response_phase_route(mcp_mode(bool(phase)))
    timeout = phases.route_timeout(spec, edge.upstream_timeout_seconds)
    upstream = service_route(edge, timeout, mcp_cluster if is_mcp else "service")
    route: dict[str, Any] = {"name": name, "match": _route_match(spec), "route": upstream}
    if is_mcp:  # its body and answer are buffered whole (contract.py)
        route["request_body_buffer_limit"] = contract.MCP_BUFFER_BYTES
    if config:
        route["typed_per_filter_config"] = config
    return route


def service_route(
    edge: Edge, timeout: int | None = None, cluster: str = "service"
) -> dict[str, Any]:
    value = edge.upstream_timeout_seconds if timeout is None else timeout
    return {"cluster": cluster, "timeout": seconds(value)}


def has_held_route(routes: Mapping[str, Mapping[str, Any]]) -> bool:
    """A route whose response phase goes over HTTP (phase_call.py): charged on success or
    metered, and not an MCP route (whose phase rewrites the answer, over gRPC)."""
    return any(phases.spec_annotations(s) and mcp.ROUTE_KEY not in s for s in routes.values())


def listens_http(transport: str, routes: Mapping[str, Mapping[str, Any]]) -> bool:
    """The sidecar's workers serve HTTP (listen_authz_http): the HTTP transport's checks, or
    a held route's response phase whichever the transport."""
    return transport == "http" or has_held_route(routes)


def has_mcp(routes: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(mcp.ROUTE_KEY in spec for spec in routes.values())


def _gateway_routes(ep: Endpoints) -> list[dict[str, Any]]:
    """Discovery, the self-serve channel requests and, where configured, the top-up: the
    side port answers them, without ext_authz (it 404s channel requests when self-serve
    channels are off)."""
    discovery = {
        "name": "x402_discovery",
        "match": {"path": contract.DISCOVERY_PATH},
        "route": {"cluster": "x402_http"},
        "typed_per_filter_config": {
            EXT_AUTHZ: {
                "@type": f"{TYPES}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True,
            }
        },
    }
    channels = {
        **copy.deepcopy(discovery),  # no shared dicts: the YAML would alias them
        "name": "x402_channels",
        "match": {"prefix": contract.CHANNEL_PATH_PREFIX},
    }
    if not ep.topup_timeout:
        return [discovery, channels]
    topup = {
        **discovery,
        "name": "x402_topup",
        "match": {"path": contract.TOPUP_PATH},
        "route": {"cluster": "x402_http", "timeout": ep.topup_timeout},
    }
    return [discovery, topup, channels]


def virtual_host_routes(
    routes: Mapping[str, Mapping[str, Any]], default_asset: str, ep: Endpoints, edge: Edge
) -> list[dict[str, Any]]:
    """Discovery, the top-up, the channel requests and a payment's preflight (answered by
    the gateway, with its CORS), the priced routes, then the catch-all to the service."""
    origins = edge.cors_origins
    per_route_http = http_service(ep) if ep.transport == "http" else None
    mcp_cluster = "mcp_service" if ep.mcp_service else "service"
    # Unannotated paths still go through ext_authz: the sidecar's own route table may
    # price them, and otherwise answers "free" without touching Redis.
    fallback = {"name": "service", "match": {"prefix": "/"}, "route": service_route(edge)}
    return [
        *(browser.with_cors(route, origins) for route in _gateway_routes(ep)),
        *browser.preflight_route(origins, service_route(edge)),
        # Exact paths first, as the sidecar's route table matches them: Envoy takes the
        # first match, so a template must not shadow one.
        *(
            priced_route(name, spec, default_asset, edge, per_route_http, mcp_cluster)
            for name, spec in sorted(
                routes.items(), key=lambda item: is_pattern(str(item[1]["path"]))
            )
        ),
        fallback,
    ]
