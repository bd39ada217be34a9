"""What the renderer is told: where everything listens (Endpoints) and the edge's hardening,
the sidecar config's `edge` mapping (Edge, docs/configuration.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sidecar.core.errors import ConfigError


@dataclass(frozen=True)
class Endpoints:
    listen: tuple[str, int] = ("0.0.0.0", 10000)  # where clients connect
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    service: tuple[str, int] = ("127.0.0.1", 8080)  # the priced upstream
    authz: tuple[str, int] = ("127.0.0.1", 9001)  # sidecar gRPC, worker 0
    # The sidecar's worker i listens on authz's port + i; each is one cluster endpoint.
    authz_workers: int = 1
    # How ext_authz asks: "grpc" (the services above) or "http" (http_service, at
    # authz_http's port + i). A held route's response phase is a call to authz_http's
    # ports whichever the transport (PROCESS_PATH, phase_call.py); an MCP route's, ext_proc
    # over gRPC.
    transport: str = "grpc"
    authz_http: tuple[str, int] = ("127.0.0.1", 9101)
    sideport: tuple[str, int] = ("127.0.0.1", 9000)  # sidecar HTTP
    authz_timeout: str = "1s"  # above the sidecar's ledger timeout, so it answers first
    # The self-serve top-up route (POST /x402/topup → the side port, no ext_authz) and how
    # long Envoy waits for it: "" renders no such route.
    topup_timeout: str = ""
    # An MCP server beside the service (the demo's): the MCP routes go to it instead.
    mcp_service: tuple[str, int] | None = None
    # The sidecar keeps responses for their payments' retries (`replay_per_payer` > 0):
    # a held route's phase call carries its body (server/envoy/phase_call.py).
    keep_responses: bool = True


@dataclass(frozen=True)
class Edge:
    """Envoy's edge hardening: the sidecar config's `edge` mapping (docs/configuration.md).
    Durations are whole seconds; 0 turns that timeout off."""

    xff_num_trusted_hops: int = 0  # proxies in front of Envoy whose X-Forwarded-For counts
    trust_request_id: bool = False  # keep a client's x-request-id (else Envoy makes one)
    strip_method_override: bool = True  # drop X-HTTP-Method-Override and its kin
    request_headers_timeout_seconds: int = 10  # the whole header block must arrive by then
    stream_idle_timeout_seconds: int = 300  # a request with no activity this long: 408
    request_timeout_seconds: int = 300  # the whole request must arrive by then
    idle_timeout_seconds: int = 3600  # a downstream connection with no request is closed
    upstream_timeout_seconds: int = 15  # the service's answer (Envoy's route timeout)
    max_request_headers_kb: int = 60  # larger header blocks: 431
    max_connections: int = 50000  # downstream connections over every listener; 0: no cap
    max_heap_bytes: int = 0  # > 0: shed load near this heap size (overload manager)
    http2_max_concurrent_streams: int = 100  # per HTTP/2 connection
    # Origins that may read the answers the gateway makes itself (discovery, the top-up,
    # 402s, its own failures) and send a payment: "*" (any, never with credentials) or
    # scheme://host[:port] each; none: no CORS from the gateway. The service's own answers
    # keep their own CORS (docs/security.md, "Browsers").
    cors_origins: tuple[str, ...] = ("*",)

    @classmethod
    def from_mapping(cls, raw: Any) -> Edge:
        """Checked `edge` config; a bad value raises ConfigError naming `edge.<key>`."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError("config edge: must be a mapping")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"config edge: unknown key {key!r}")
            if isinstance(known[key].default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"config edge.{key}: must be true or false")
            elif isinstance(known[key].default, tuple):
                value = _origins(key, value)
            else:
                low, high = _EDGE_BOUNDS.get(key, (0, 2**31 - 1))
                if type(value) is not int or not low <= value <= high:
                    raise ConfigError(f"config edge.{key}: must be an integer {low}..{high}")
            values[key] = value
        return cls(**values)


ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?")


def _origins(key: str, value: Any) -> tuple[str, ...]:
    """A list of browser origins: "*" alone, or scheme://host[:port] in lower case."""
    if not isinstance(value, list | tuple) or not all(isinstance(o, str) for o in value):
        raise ConfigError(f"config edge.{key}: must be a list of origins")
    if "*" in value and len(value) > 1:
        raise ConfigError(f'config edge.{key}: "*" allows any origin; list it alone')
    for origin in value:
        if origin != "*" and ORIGIN.fullmatch(origin) is None:
            raise ConfigError(
                f"config edge.{key}: {origin!r} is not an origin like https://app.example "
                "(scheme://host[:port], lower case, no path)"
            )
    return tuple(value)


_EDGE_BOUNDS = {
    "max_request_headers_kb": (1, 8192),  # Envoy's own limits
    "http2_max_concurrent_streams": (1, 2**31 - 1),
    "xff_num_trusted_hops": (0, 16),
    "max_heap_bytes": (0, 2**63 - 1),
}
