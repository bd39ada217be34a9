"""Drive the real ext_authz servicer in-process (real Redis, no Envoy) for high-volume tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.ledger.accounts import Ledger
from sidecar.ledger.pipe import RedisPipe, Script
from sidecar.server.authz.check import CheckService
from sidecar.server.authz.grpc_transport import check_message
from sidecar.server.config import Settings
from sidecar.tools.stack import Stack
from tests.support.streams import raw, raw_pipe


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str
    body: dict[str, Any]
    headers: dict[str, str]


def check_request(
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    context_extensions: Mapping[str, str] | None = None,
) -> authz.CheckRequest:
    request = authz.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, "gateway.test", "http"
    http.headers.update(headers or {})
    request.attributes.context_extensions.update(context_extensions or {})
    return request


def outcome(response: authz.CheckResponse) -> Outcome:
    if response.status.code == 0:
        ok = response.ok_response
        headers = {h.header.key: h.header.value for h in ok.response_headers_to_add}
        return Outcome(200, "allow", {}, headers)
    denied = response.denied_response
    body = json.loads(denied.body)
    headers = {h.header.key: h.header.value for h in denied.headers}
    return Outcome(denied.status.code, body["error"], body, headers)


def servicer_for(stack: Stack) -> tuple[CheckService, Ledger]:
    settings = Settings.load(stack.config_path, env={})
    ledger = Ledger.from_url(stack.redis_url)
    return CheckService(settings.route_table(), settings.gateway(), ledger), ledger


async def check(servicer: CheckService, request: authz.CheckRequest) -> Outcome:
    return outcome(await check_message(servicer, request))


async def cancel_while_redis_stalls(
    servicer: CheckService, ledger: Ledger, script: Script, request: authz.CheckRequest
) -> None:
    """Envoy gives up on a check while Redis stalls (DEBUG SLEEP): the check is cancelled
    after its ledger step was sent, and Redis then answers it."""
    pipe = raw_pipe(servicer.ledger)
    assert isinstance(pipe, RedisPipe)  # one Redis here, not a cluster
    await pipe.call("SCRIPT", "LOAD", script.source)  # connected, the script loaded
    pause = asyncio.create_task(raw(ledger).execute_command("DEBUG", "SLEEP", "0.5"))
    await asyncio.sleep(0.05)
    task = asyncio.create_task(check_message(servicer, request))
    await asyncio.sleep(0.1)
    task.cancel()
    await pause
    await asyncio.sleep(0.2)  # the step's reply, and its bookkeeping
