"""Assemble and run the sidecar: ext_authz + gRPC health, the HTTP side port, the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from sidecar import logs
from sidecar.config import Settings
from sidecar.errors import ConfigError
from sidecar.ledger import Ledger
from sidecar.servicer import Authorization
from sidecar.sideport import SidePort, start_http

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
SHUTDOWN_GRACE_SECONDS = 5.0


def split_host_port(address: str, key: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"config {key}: {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain: readiness flips first, in-flight checks end."""
    logs.configure(settings.log_level)
    log = logs.get_logger("sidecar.server")
    routes, gateway = settings.route_table(), settings.gateway()
    http_host, http_port = split_host_port(settings.listen_http, "listen_http")
    ledger = Ledger.from_url(settings.redis_url, timeout=settings.redis_timeout_ms / 1000)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    authz_grpc.add_AuthorizationServicer_to_server(Authorization(routes, gateway, ledger), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(settings.listen_grpc) == 0:
        raise ConfigError(f"config listen_grpc: cannot listen on {settings.listen_grpc}")
    side = SidePort(routes, gateway, ledger)
    try:
        http = await start_http(side.respond, http_host, http_port)
    except OSError as exc:
        raise ConfigError(
            f"config listen_http: cannot listen on {settings.listen_http}: {exc.strerror}"
        ) from None
    await server.start()
    for service in ("", AUTHZ_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "sidecar.started",
        listen_grpc=settings.listen_grpc,
        listen_http=settings.listen_http,
        payee=gateway.payee,
        routes=len(routes.routes),
        ledger_ready=await ledger.ping(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("sidecar.stopping", grace_seconds=SHUTDOWN_GRACE_SECONDS)
    side.ready = False
    await health.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    http.close()
    with contextlib.suppress(Exception):
        await ledger.close()
    log.info("sidecar.stopped")


def run(settings: Settings) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
