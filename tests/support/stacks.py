"""Stacks beyond conftest's default one (tools/stack.py starts them)."""

from __future__ import annotations

import os

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc

from sidecar.core.identity import write_secret
from sidecar.server.authz import http_transport
from sidecar.server.authz.grpc_answers import DENIAL_METADATA_KEY
from sidecar.tools.stack import Stack, free_port
from tests.support.routes import ENVOY_ROUTES, ROUTES

ADMIN_TOKEN = "t0ken-" + "x" * 26  # a test secret, written to the stack's admin token file


def admin_stack() -> Stack:
    """Two sidecar workers (metrics aggregate across them) and the admin API with a token;
    not started yet."""
    stack = Stack(ROUTES, envoy_routes=ENVOY_ROUTES, workers=2)
    token_file = stack.dir / "admin.token"
    write_secret(token_file, ADMIN_TOKEN + "\n")
    stack.ports["admin_api"] = free_port()
    stack.settings = {
        "listen_admin": f"127.0.0.1:{stack.ports['admin_api']}",
        "admin_token_file": str(token_file),
        "anchor_file": str(stack.dir / "anchors.jsonl"),
    }
    return stack


def over_http(stack: Stack) -> bool:
    """Whether Envoy asks this stack's sidecar over the HTTP transport (X402_TRANSPORT)."""
    return stack.transport == "http"


# Envoy-side prices (context_extensions) exist only on the gRPC wire; over HTTP the sidecar
# prices from its own route table, and a price written only in Envoy's config is not one.
grpc_only_prices = pytest.mark.skipif(
    os.environ.get("X402_TRANSPORT", "grpc") == "http",
    reason="Envoy-side price annotations are context_extensions: gRPC transport only",
)


def authz_endpoints(stack: Stack) -> tuple[str, list[str]]:
    """Envoy's cluster for the checks and its hosts, one per sidecar worker."""
    cluster, port = (
        ("x402_authz_http", "authz_http") if over_http(stack) else ("x402_authz", "grpc")
    )
    return cluster, [f"127.0.0.1:{stack.ports[port] + i}" for i in range(stack.workers)]


def ask_sidecar(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """Ask worker 0 directly, as Envoy does over the stack's transport: 200 for an allow,
    else the status and body Envoy would answer the denial with."""
    if over_http(stack):
        answer = httpx.get(
            f"http://127.0.0.1:{stack.ports['authz_http']}{path}",
            headers={"host": "gw", **headers},
            timeout=5,
        )
        status = answer.status_code
        if answer.headers.get(DENIAL_METADATA_KEY) == http_transport.UNAVAILABLE_MARK:
            status = 503  # the stand-in Envoy's local-reply mapper turns back into a 503
        return status, answer.content
    check = authz.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host, http.scheme = "GET", path, "gw", "http"
    http.headers.update({name.lower(): value for name, value in headers.items()})
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['grpc']}") as channel:
        response: authz.CheckResponse = authz_grpc.AuthorizationStub(channel).Check(
            check, timeout=5
        )
    if response.status.code == 0:
        return 200, b""
    denied = response.denied_response
    return denied.status.code, denied.body.encode()
