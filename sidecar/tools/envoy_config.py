"""Render the Envoy config that puts the sidecar in front of a service.

One renderer serves the reference `envoy/envoy.yaml`, the demo, the tests and the bench,
so they cannot drift apart. Each priced route becomes an Envoy route annotated with its
price as ext_authz `context_extensions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sidecar.core.pricing import ANY_METHOD, EXT_ASSET, EXT_DESCRIPTION, EXT_PRICE, EXT_ROUTE

_TYPES = "type.googleapis.com/envoy.extensions"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
DISCOVERY_PATH = "/.well-known/x402"
_ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
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
    sideport: tuple[str, int] = ("127.0.0.1", 9000)  # sidecar HTTP
    authz_timeout: str = "1s"  # above the sidecar's ledger timeout, so it answers first


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cluster(
    name: str, host: str, port: int, http2: bool = False, count: int = 1
) -> dict[str, Any]:
    """`count` endpoints on consecutive ports from `port`."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
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


def _path_match(path: str) -> dict[str, Any]:
    if "{" not in path:
        return {"path": path}
    parts = re.split(r"\{[A-Za-z_][A-Za-z0-9_]*\}", path)
    return {"safe_regex": {"regex": "[^/]+".join(re.escape(p) for p in parts)}}


def priced_route(name: str, spec: Mapping[str, Any], default_asset: str) -> dict[str, Any]:
    match = _path_match(str(spec["path"]))
    method = str(spec.get("method", ANY_METHOD)).upper()
    if method != ANY_METHOD:
        match["headers"] = [{"name": ":method", "string_match": {"exact": method}}]
    extensions = {
        EXT_ROUTE: name,
        EXT_PRICE: str(spec["price"]),
        EXT_ASSET: str(spec.get("asset", default_asset)),
    }
    if spec.get("description"):
        extensions[EXT_DESCRIPTION] = str(spec["description"])
    return {
        "name": name,
        "match": match,
        "route": {"cluster": "service"},
        "typed_per_filter_config": {
            EXT_AUTHZ: {
                "@type": f"{_TYPES}.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "check_settings": {"context_extensions": extensions},
            }
        },
    }


def render(
    routes: Mapping[str, Mapping[str, Any]],
    default_asset: str = "USDF",
    endpoints: Endpoints | None = None,
) -> dict[str, Any]:
    ep = endpoints or Endpoints()
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
    # Unannotated paths still go through ext_authz: the sidecar's own route table may
    # price them, and otherwise answers "free" without touching Redis.
    fallback = {"name": "service", "match": {"prefix": "/"}, "route": {"cluster": "service"}}
    hcm = {
        "@type": f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        # Price and proofs bind to the normalized path, never to an alias of it.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
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
                    "routes": [
                        discovery,
                        # Exact paths first, as the sidecar's route table matches them:
                        # Envoy takes the first match, so a template must not shadow one.
                        *(
                            priced_route(name, spec, default_asset)
                            for name, spec in sorted(
                                routes.items(), key=lambda item: "{" in str(item[1]["path"])
                            )
                        ),
                        fallback,
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": EXT_AUTHZ,
                "typed_config": {
                    "@type": f"{_TYPES}.filters.http.ext_authz.v3.ExtAuthz",
                    "transport_api_version": "V3",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "x402_authz"},
                        "timeout": ep.authz_timeout,
                    },
                    # Fail closed: no sidecar answer means no free pass, and a 503.
                    "failure_mode_allow": False,
                    "status_on_error": {"code": "ServiceUnavailable"},
                },
            },
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
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _address(*ep.listen),
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
                _cluster("x402_http", *ep.sideport),
                _cluster("service", *ep.service),
            ],
        },
    }


def render_yaml(
    routes: Mapping[str, Mapping[str, Any]],
    default_asset: str = "USDF",
    endpoints: Endpoints | None = None,
) -> str:
    header = (
        "# Envoy in front of a service, with the x402 sidecar as ext_authz.\n"
        "# Generated by `x402 envoy-config`; edit the sidecar config's routes, not this file.\n"
    )
    return header + yaml.safe_dump(
        render(routes, default_asset, endpoints), sort_keys=False, width=100
    )
