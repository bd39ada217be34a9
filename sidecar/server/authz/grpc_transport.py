"""Envoy's ext_authz over gRPC (`transport: grpc`, the default): a CheckRequest in, the
CheckResponse bytes of check.Authorization's decision out (grpc_answers.py), unserialized
by grpc.aio. Envoy's deadline comes with the call; when Envoy gives up, grpc.aio cancels
the handler, so the check's paid part runs shielded (check.Facts.cancels)."""

from __future__ import annotations

import time
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.server.authz.check import CheckService, Facts

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


def grpc_facts(check: authz.CheckRequest, context: Any) -> Facts:
    attributes = check.attributes
    http = attributes.request.http
    remaining = None if context is None else context.time_remaining()
    path, _, query = http.path.partition("?")
    return Facts(
        http.method,
        path,
        http.host,
        http.scheme or "http",
        http.headers,
        attributes.context_extensions,
        attributes.source.address.socket_address.address,
        None if remaining is None else time.perf_counter() + remaining,
        cancels=True,
        query=query,
        body=http.raw_body or http.body.encode(),  # MCP routes only (with_request_body)
    )


class GrpcChecks:
    """The ext_authz servicer of a grpc.aio server, around one CheckService."""

    def __init__(self, checks: CheckService) -> None:
        self.checks = checks

    def handler(self) -> grpc.GenericRpcHandler:
        """ext_authz for a grpc.aio server; `check`'s bytes go out unserialized."""
        check = grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=authz.CheckRequest.FromString
        )
        return grpc.method_handlers_generic_handler(AUTHZ_SERVICE, {"Check": check})

    async def check(self, check: authz.CheckRequest, context: Any) -> bytes:
        return await self.checks.decide(grpc_facts(check, context))


async def check_message(
    checks: CheckService, check: authz.CheckRequest, context: Any = None
) -> authz.CheckResponse:
    """One check as messages, as the gRPC transport runs it: for tests and tools."""
    answer = await checks.decide(grpc_facts(check, context))
    return authz.CheckResponse.FromString(answer)
