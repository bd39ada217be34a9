"""Render the Envoy config that puts the sidecar in front of a service.

One renderer serves the reference `envoy/envoy.yaml`, the demo, the tests and the bench,
so they cannot drift apart. Each priced route becomes an Envoy route; over the gRPC
transport it is annotated with its price as ext_authz `context_extensions`, over the HTTP
transport (server/authz/http_transport.py) the sidecar prices it from its own route table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sidecar.core import holds
from sidecar.core.decision import FIELD_BYTES, UPSTREAM_HEADERS
from sidecar.core.pricing import (
    ANY_METHOD,
    EXT_ASSET,
    EXT_DESCRIPTION,
    EXT_PRICE,
    EXT_ROUTE,
    is_pattern,
    path_regex,
)
from sidecar.core.protocol import DISCOVERY_PATH, PROOF_HEADERS
from sidecar.server.authz import http_transport as http_authz
from sidecar.server.authz.grpc_answers import DENIAL_METADATA_KEY
from sidecar.server.config import TOPUP_PATH, Edge, Settings
from sidecar.tools import envoy_browser

_TYPES = "type.googleapis.com/envoy.extensions"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
TRANSPORTS = ("grpc", "http")
# A client writes the method and path: the access log keeps FIELD_BYTES of each, as the
# sidecar's own lines do (a 60 KB path would otherwise be a 60 KB line).
_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": f"%REQ(X-REQUEST-ID):{FIELD_BYTES}%",
    "method": f"%REQ(:METHOD):{FIELD_BYTES}%",
    "path": f"%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):{FIELD_BYTES}%",
    "status": "%RESPONSE_CODE%",
    "duration_ms": "%DURATION%",
    "payer": f"%DYNAMIC_METADATA({EXT_AUTHZ}:payer)%",
    "amount": f"%DYNAMIC_METADATA({EXT_AUTHZ}:amount)%",
    "receipt_id": f"%DYNAMIC_METADATA({EXT_AUTHZ}:receipt_id)%",
}


@dataclass(frozen=True)
class Endpoints:
    listen: tuple[str, int] = ("0.0.0.0", 10000)  # where clients connect
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    service: tuple[str, int] = ("127.0.0.1", 8080)  # the priced upstream
    authz: tuple[str, int] = ("127.0.0.1", 9001)  # sidecar gRPC, worker 0
    # The sidecar's worker i listens on authz's port + i; each is one cluster endpoint.
    authz_workers: int = 1
    # How ext_authz asks: "grpc" (the Check service above) or "http" (http_service, at
    # authz_http's port + i; the response phase stays on gRPC, ext_proc has no HTTP mode).
    transport: str = "grpc"
    authz_http: tuple[str, int] = ("127.0.0.1", 9101)
    sideport: tuple[str, int] = ("127.0.0.1", 9000)  # sidecar HTTP
    authz_timeout: str = "1s"  # above the sidecar's ledger timeout, so it answers first
    # The self-serve top-up route (POST /x402/topup → the side port, no ext_authz) and how
    # long Envoy waits for it: "" renders no such route.
    topup_timeout: str = ""


def timeouts(settings: Settings) -> tuple[str, str]:
    """Envoy's ext_authz timeout and the top-up route's ("": no top-up route) for a sidecar
    config: above everything the sidecar may wait for, so the sidecar always answers first.
    With the `exact` scheme a check waits for the facilitator's /verify and /settle (a real
    chain's settle takes seconds), the on-chain lookup of a settle whose answer was lost
    (chain_lookup_ms) and three ledger steps; the top-up adds its credit (one more ledger
    step) and a second. The ext_proc filter's message
    timeout (the response phase) is the same: on a `charge: on_success` route `exact` is
    /settle'd there, after the service succeeded. The chart computes the same."""
    redis_ms = settings.redis_timeout_ms
    floor_ms = max(1000, redis_ms + 500)
    terms = settings.exact_terms()
    if terms is None:
        return _duration_ms(floor_ms), ""
    exact_ms = (
        settings.facilitator_verify_timeout_ms
        + settings.facilitator_settle_timeout_ms
        + settings.chain_lookup_ms
        + 3 * redis_ms
        + 1000
    )
    authz_ms = max(redis_ms + 500, exact_ms)
    topup = _millis(exact_ms + redis_ms + 1000) if terms.topup else ""
    return _millis(authz_ms), topup


def _millis(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}s"


def _duration_ms(ms: int) -> str:
    return f"{ms / 1000:g}s"


# Headers the gateway asserts to the service (the sidecar's x-x402-payer, -amount,
# -receipt-id and any added later), and Envoy's own x-envoy-* control headers: a client's
# copies are removed before any filter runs. The sidecar sets its own at ext_authz allow.
ASSERTED_PREFIXES = ("x-x402-", "x-envoy-")
# Headers some frameworks take as the request's real method, so a GET priced as free
# could run as a DELETE in the service: removed unless `edge.strip_method_override` is off.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
REQUEST_ID = "x-request-id"
# Fixed edge limits (Envoy's edge-proxy guidance); docs/configuration.md lists them.
BUFFER_LIMIT_BYTES = 32768
HTTP2_STREAM_WINDOW_BYTES = 65536
HTTP2_CONNECTION_WINDOW_BYTES = 1048576


def _seconds(value: int) -> str:
    return f"{value}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str, host: str, port: int, http2: bool = False, count: int = 1
) -> dict[str, Any]:
    """`count` endpoints on consecutive ports from `port`: an IP literal is STATIC, a
    hostname (a Kubernetes Service) STRICT_DNS, re-resolved as its DNS answers change.
    HTTP/1 clusters (the service, the side port) get the edge's 32 KiB buffer limit; the
    sidecar's gRPC cluster keeps Envoy's default: one HTTP/2 connection per worker
    multiplexes every check, a small buffer would throttle the hot path, and its messages
    are small and its peer is ours."""
    dns = not _is_ip(host)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "1s",
        **({"dns_lookup_family": "V4_PREFERRED"} if dns else {}),
        **({} if http2 else {"per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES}),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _address(host, port + i)}} for i in range(count)
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_TYPES}.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _path_match(path: str) -> dict[str, Any]:
    if not is_pattern(path):  # wildcards (*, **, {param}) match as the sidecar's regex
        return {"path": path}
    return {"safe_regex": {"regex": path_regex(path)}}


def priced_route(
    name: str,
    spec: Mapping[str, Any],
    default_asset: str,
    edge: Edge | None = None,
    http_service: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An Envoy route for a priced route. Over gRPC its price rides along as
    context_extensions; over HTTP (`http_service`: the filter's) there are none, and a
    route with a response phase says so with a header on its checks instead."""
    match = _path_match(str(spec["path"]))
    method = str(spec.get("method", ANY_METHOD)).upper()
    if method == "GET":  # HEAD runs the GET handler: the sidecar prices it as GET
        methods: dict[str, Any] = {"safe_regex": {"regex": "GET|HEAD"}}
        match["headers"] = [{"name": ":method", "string_match": methods}]
    elif method != ANY_METHOD:
        match["headers"] = [{"name": ":method", "string_match": {"exact": method}}]
    extensions = {EXT_ROUTE: name}
    if "price" in spec:  # a metered route is priced by its unit price (below)
        extensions[EXT_PRICE] = str(spec["price"])
    extensions[EXT_ASSET] = str(spec.get("asset", default_asset))
    if spec.get("description"):
        extensions[EXT_DESCRIPTION] = str(spec["description"])
    phase = holds.spec_annotations(spec)
    extensions.update(phase)
    edge = edge or Edge()
    check_settings: dict[str, Any] = {"context_extensions": extensions}
    if http_service is not None:
        check_settings = {}
        if phase:
            check_settings["http_service"] = _with_headers(
                http_service, {http_authz.PHASE_HEADER: holds.PHASE_RESPONSE}
            )
    config: dict[str, Any] = {}
    if check_settings:
        config[EXT_AUTHZ] = {
            "@type": f"{_TYPES}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "check_settings": check_settings,
        }
    if phase:  # charge: on_success: the response phase runs on this route alone
        config[EXT_PROC] = response_phase_route()
    timeout = holds.route_timeout(spec, edge.upstream_timeout_seconds)
    route = {"name": name, "match": match, "route": _service_route(edge, timeout)}
    if config:
        route["typed_per_filter_config"] = config
    return route


def _exact(names: Iterable[str]) -> dict[str, Any]:
    return {"patterns": [{"exact": name} for name in names]}


def _with_headers(http_service: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """The filter's http_service with more headers on each check."""
    request = dict(http_service["authorization_request"])
    request["headers_to_add"] = [
        *request.get("headers_to_add", []),
        *({"key": key, "value": value} for key, value in headers.items()),
    ]
    return {**http_service, "authorization_request": request}


# What Envoy sends of each request to the sidecar: what the decision reads, and no cookies,
# credentials or bodies (the smaller CheckRequest is also cheaper to build and parse).
AUTHZ_REQUEST_HEADERS = (*PROOF_HEADERS, REQUEST_ID)


def ext_authz_filter(ep: Endpoints) -> dict[str, Any]:
    """Envoy's ext_authz filter over the configured transport. Fail closed either way: no
    sidecar answer means no free pass, and a 503."""
    config: dict[str, Any] = {
        "@type": f"{_TYPES}.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
    }
    if ep.transport == "http":
        config["http_service"] = http_service(ep)
        config["allowed_headers"] = _exact(http_authz.REQUEST_HEADERS)
    else:
        config["grpc_service"] = {
            "envoy_grpc": {"cluster_name": "x402_authz"},
            "timeout": ep.authz_timeout,
        }
        config["allowed_headers"] = _exact(AUTHZ_REQUEST_HEADERS)
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
                {"key": http_authz.TIMEOUT_HEADER, "value": str(_ms(ep.authz_timeout))}
            ],
        },
        "authorization_response": {
            "allowed_upstream_headers": _exact(UPSTREAM_HEADERS),
            "allowed_client_headers": _exact(http_authz.DENIAL_HEADERS),
            "allowed_client_headers_on_success": _exact(http_authz.SUCCESS_HEADERS),
            "dynamic_metadata_from_headers": _exact(http_authz.METADATA_KEYS),
        },
    }


def _ms(duration: str) -> int:
    """Milliseconds of an Envoy duration string ("1s", "0.3s", "1.250s")."""
    return round(float(duration.removesuffix("s")) * 1000)


def _service_route(edge: Edge, timeout: int | None = None) -> dict[str, Any]:
    seconds = edge.upstream_timeout_seconds if timeout is None else timeout
    return {"cluster": "service", "timeout": _seconds(seconds)}


def has_response_phase(routes: Mapping[str, Mapping[str, Any]]) -> bool:
    return any(holds.spec_annotations(spec) for spec in routes.values())


def response_phase_route() -> dict[str, Any]:
    """Enables the ext_proc filter (disabled in the chain) on one route."""
    return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {
        "@type": f"{_TYPES}.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": PROCESSING_MODE},
    }}  # fmt: skip


# Only the response's headers go to the sidecar: no request message, no bodies.
PROCESSING_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}


def response_phase_filter(timeout: str) -> dict[str, Any]:
    """Envoy's ext_proc filter for the response phase (server/processor.py), disabled
    unless a route enables it. Fail closed: if the sidecar cannot be asked (down, too
    slow), the client gets an error, never the response; the hold it could not capture
    expires and the ledger releases it, so nothing is charged either."""
    return {
        "name": EXT_PROC,
        "disabled": True,
        "typed_config": {
            "@type": f"{_TYPES}.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "x402_authz"}},
            "failure_mode_allow": False,
            "processing_mode": PROCESSING_MODE,
            "message_timeout": timeout,
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
        for prefix in ASSERTED_PREFIXES
    ]
    if edge.strip_method_override:
        mutations += [{"remove": name} for name in METHOD_OVERRIDE_HEADERS]
    if not edge.trust_request_id:  # Envoy then generates one, even for a loopback peer
        mutations.append({"remove": REQUEST_ID})
    return [
        {
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": f"{_TYPES}.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": mutations,
            },
        }
    ]


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


def local_reply_config(origins: Iterable[str] = ()) -> dict[str, Any]:
    """Envoy's own failures in the JSON envelope of docs/protocol.md §5. The first mapper
    matches the sidecar's ext_authz denials (marked with dynamic metadata) and changes
    nothing, so their status, headers and body reach the client as the sidecar wrote them.
    Every one carries the gateway's CORS for `origins` (envoy_browser.cors_replies).
    (The overload manager's own 503 "envoy overloaded" is sent before local_reply_config is
    consulted, in Envoy 1.40: it stays plain text, so no mapper is written for it.)"""
    sidecar_denial = _denial_filter({"present_match": True})
    # Over the HTTP transport a sidecar 503 arrives as a stand-in status (a 5xx would be
    # taken for the sidecar's own failure): its status comes back, its body stays.
    unavailable = _denial_filter({"string_match": {"exact": http_authz.UNAVAILABLE_MARK}})
    mappers: list[dict[str, Any]] = [
        {"filter": unavailable, "status_code": 503},
        {"filter": sidecar_denial},
        # ext_authz failed (sidecar down, timed out, refused): fail closed.
        _reply(
            _flags("UAEX"),
            "authz_unavailable",
            "the payment check is unavailable; retry shortly",
            503,
            retry=True,
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
    return {"mappers": envoy_browser.cors_replies(mappers, tuple(origins))}


def overload_manager(edge: Edge) -> dict[str, Any]:
    monitors: list[dict[str, Any]] = []
    actions: list[dict[str, Any]] = []
    if edge.max_connections:
        monitors.append(
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": f"{_TYPES}.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": edge.max_connections,
                },
            }
        )
    if edge.max_heap_bytes:
        heap = "envoy.resource_monitors.fixed_heap"
        monitors.append(
            {
                "name": heap,
                "typed_config": {
                    "@type": f"{_TYPES}.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    "max_heap_size_bytes": edge.max_heap_bytes,
                },
            }
        )
        actions = [
            {"name": name, "triggers": [{"name": heap, "threshold": {"value": value}}]}
            for name, value in (
                ("envoy.overload_actions.shrink_heap", 0.95),
                ("envoy.overload_actions.stop_accepting_requests", 0.98),
            )
        ]
    manager: dict[str, Any] = {"refresh_interval": "0.25s", "resource_monitors": monitors}
    if actions:
        manager["actions"] = actions
    return manager


def virtual_host_routes(
    routes: Mapping[str, Mapping[str, Any]], default_asset: str, ep: Endpoints, edge: Edge
) -> list[dict[str, Any]]:
    """Discovery, the top-up and a payment's preflight (answered by the gateway, with its
    CORS), the priced routes, then the catch-all to the service."""
    origins = edge.cors_origins
    discovery = {
        "name": "x402_discovery",
        "match": {"path": DISCOVERY_PATH},
        "route": {"cluster": "x402_http"},
        "typed_per_filter_config": {
            EXT_AUTHZ: {
                "@type": f"{_TYPES}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True,
            }
        },
    }
    topup = []
    if ep.topup_timeout:  # the side port prices and settles it itself
        topup = [
            {
                **discovery,
                "name": "x402_topup",
                "match": {"path": TOPUP_PATH},
                "route": {"cluster": "x402_http", "timeout": ep.topup_timeout},
            }
        ]
    per_route_http = http_service(ep) if ep.transport == "http" else None
    # Unannotated paths still go through ext_authz: the sidecar's own route table may
    # price them, and otherwise answers "free" without touching Redis.
    fallback = {"name": "service", "match": {"prefix": "/"}, "route": _service_route(edge)}
    return [
        *(envoy_browser.with_cors(route, origins) for route in (discovery, *topup)),
        *envoy_browser.preflight_route(origins, _service_route(edge)),
        # Exact paths first, as the sidecar's route table matches them: Envoy takes the
        # first match, so a template must not shadow one.
        *(
            priced_route(name, spec, default_asset, edge, per_route_http)
            for name, spec in sorted(
                routes.items(), key=lambda item: is_pattern(str(item[1]["path"]))
            )
        ),
        fallback,
    ]


def render(
    routes: Mapping[str, Mapping[str, Any]],
    default_asset: str = "USDF",
    endpoints: Endpoints | None = None,
    edge: Edge | None = None,
) -> dict[str, Any]:
    ep = endpoints or Endpoints()
    edge = edge or Edge()
    if ep.transport not in TRANSPORTS:
        raise ValueError(f"transport {ep.transport!r}: one of {', '.join(TRANSPORTS)}")
    hcm = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        # Price and proofs bind to the normalized path, never to an alias of it.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        # The edge: the peer is the client (plus trusted proxies' X-Forwarded-For), and
        # nothing a client sends may pose as the gateway (docs/security.md).
        "use_remote_address": True,
        "xff_num_trusted_hops": edge.xff_num_trusted_hops,
        "early_header_mutation_extensions": early_header_mutation(edge),
        "preserve_external_request_id": edge.trust_request_id,
        "always_set_request_id_in_response": True,
        "request_headers_timeout": _seconds(edge.request_headers_timeout_seconds),
        "stream_idle_timeout": _seconds(edge.stream_idle_timeout_seconds),
        "request_timeout": _seconds(edge.request_timeout_seconds),
        "max_request_headers_kb": edge.max_request_headers_kb,
        "common_http_protocol_options": {
            "idle_timeout": _seconds(edge.idle_timeout_seconds),
            # x_x402_payer is x-x402-payer to CGI/WSGI services: such headers are dropped.
            "headers_with_underscores_action": "DROP_HEADER",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": edge.http2_max_concurrent_streams,
            "initial_stream_window_size": HTTP2_STREAM_WINDOW_BYTES,
            "initial_connection_window_size": HTTP2_CONNECTION_WINDOW_BYTES,
        },
        "local_reply_config": local_reply_config(edge.cors_origins),
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": f"{_TYPES}.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"json_format": _ACCESS_LOG_FORMAT},
                },
            }
        ],
        "route_config": {
            "name": "priced",
            "virtual_hosts": [
                {
                    "name": "service",
                    "domains": ["*"],
                    "routes": virtual_host_routes(routes, default_asset, ep, edge),
                }
            ],
        },
        "http_filters": [
            {
                "name": envoy_browser.CORS,
                "typed_config": {"@type": f"{_TYPES}.filters.http.cors.v3.Cors"},
            },
            ext_authz_filter(ep),
            *([response_phase_filter(ep.authz_timeout)] if has_response_phase(routes) else []),
            envoy_browser.strip_dashboard_cookie(),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.router.v3.Router",
                },
            },
        ],
    }
    return {
        "admin": {"address": _address(*ep.admin)},
        "overload_manager": overload_manager(edge),
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _address(*ep.listen),
                    # A second Envoy on this address fails to start instead of sharing it.
                    "enable_reuse_port": False,
                    "per_connection_buffer_limit_bytes": BUFFER_LIMIT_BYTES,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _cluster("x402_authz", *ep.authz, http2=True, count=ep.authz_workers),
                *(
                    [_cluster("x402_authz_http", *ep.authz_http, count=ep.authz_workers)]
                    if ep.transport == "http"
                    else []
                ),
                _cluster("x402_http", *ep.sideport),
                _cluster("service", *ep.service),
            ],
        },
    }


def render_yaml(
    routes: Mapping[str, Mapping[str, Any]],
    default_asset: str = "USDF",
    endpoints: Endpoints | None = None,
    edge: Edge | None = None,
) -> str:
    header = (
        "# Envoy in front of a service, with the x402 sidecar as ext_authz.\n"
        "# Generated by `x402 envoy-config`; edit the sidecar config's routes, not this file.\n"
    )
    return header + yaml.safe_dump(
        render(routes, default_asset, endpoints, edge), sort_keys=False, width=100
    )
