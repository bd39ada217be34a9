"""Run the sidecar: a supervisor process and one worker process per core.

The gRPC framework's per-check Python holds the GIL, so one process cannot use more than
one core (docs/performance.md, "The server model"). `run` validates the config, then forks
`workers` processes before any gRPC object exists (gRPC's threads do not survive a fork).
Worker i serves ext_authz and gRPC health on its own port, listen_grpc's port + i; Envoy
lists every worker as an endpoint of its x402_authz cluster (server/envoy/edge.py,
Endpoints.authz_workers) and spreads checks evenly. SO_REUSEPORT would not: Envoy keeps a
few long-lived HTTP/2 connections and the kernel pins each to one process. Worker 0 also
serves the HTTP side port.

The supervisor does nothing else: it restarts a worker that dies (a crash loop makes it
stop everything and exit 1, for Kubernetes to restart the pod), and on SIGTERM or SIGINT
it passes the signal on and waits for every worker to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import math
import mmap
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from sidecar.core.decision import Gateway
from sidecar.core.errors import ConfigError
from sidecar.ledger.accounts import Ledger, check_url
from sidecar.ledger.pipe import redacted
from sidecar.server import logs, metrics, side_services, wiring
from sidecar.server.addresses import split_host_port
from sidecar.server.admin import Facilities, check_listener, start_facilities
from sidecar.server.authz import http_transport
from sidecar.server.authz.check import CheckService
from sidecar.server.authz.grpc_transport import AUTHZ_SERVICE, GrpcChecks
from sidecar.server.config import Settings
from sidecar.server.envoy.contract import TOPUP_PATH
from sidecar.server.processing.grpc_transport import PROCESSOR_SERVICE, GrpcProcessor
from sidecar.server.processing.http_transport import HttpProcessor
from sidecar.server.processing.phase import Processor
from sidecar.server.reconcile import reconcile_forever
from sidecar.server.route_report import print_route_table
from sidecar.server.schemes.base import sweep_forever
from sidecar.server.side_port import AnyReply, Headers, SidePort, SideServer, start_http

SHUTDOWN_GRACE_SECONDS = 5.0
CRASH_LOOP_RESTARTS = 5  # worker restarts within CRASH_LOOP_SECONDS before giving up
CRASH_LOOP_SECONDS = 60.0
EXIT_CONFIG = 78  # a worker's config cannot work (sysexits EX_CONFIG): stop, do not restart
STARTING, SERVING, DRAINING = 0, 1, 2


def drain_seconds(settings: Settings) -> float:
    """How long a stopping worker gives what it is answering: the longest a check or a
    top-up can take (with `exact`: the facilitator's verify and settle, the chain lookup
    and the ledger steps, summed as Envoy's timeouts are), at least SHUTDOWN_GRACE_SECONDS.
    Shorter, a SIGTERM mid-settle would move the payer's money and answer nothing."""
    if not settings.onchain:
        return SHUTDOWN_GRACE_SECONDS
    ms = (
        settings.facilitator_verify_timeout_ms
        + settings.facilitator_settle_timeout_ms
        + settings.chain_lookup_ms
        + 4 * settings.redis_timeout_ms
        + 2000
    )
    return max(SHUTDOWN_GRACE_SECONDS, float(math.ceil(ms / 1000)))


def worker_addresses(settings: Settings, key: str = "listen_grpc") -> list[str]:
    """Worker i listens on the port of `key` (listen_grpc, listen_authz_http) + i."""
    host, port = split_host_port(getattr(settings, key), key)
    workers = settings.workers
    if port == 0 or port + workers > 65536:
        raise ConfigError(
            f"config {key}: {workers} workers need ports {port}..{port + workers - 1}"
        )
    spans = {"listen_http": 1, "listen_grpc": workers}
    if settings.listen_health:
        spans["listen_health"] = 1
    if settings.listens_http:
        spans["listen_authz_http"] = workers
    for other, span in spans.items():
        _, start = split_host_port(getattr(settings, other), other)
        if other != key and start < port + workers and port < start + span:
            raise ConfigError(
                f"config {other}: its ports overlap the workers' on {key} "
                f"({port}..{port + workers - 1}); worker i listens on {key}'s port + i"
            )
    host = f"[{host}]" if ":" in host else host
    return [f"{host}:{port + i}" for i in range(workers)]


class WorkerBoard:
    """Each worker's state in memory shared across the fork, for worker 0's /readyz."""

    def __init__(self, workers: int) -> None:
        self.states = mmap.mmap(-1, workers)  # anonymous and MAP_SHARED: survives fork

    def set(self, worker: int, state: int) -> None:
        self.states[worker] = state

    def all_serving(self) -> bool:
        return all(state == SERVING for state in self.states[:])  # bytes → ints


async def serve(settings: Settings, worker: int, board: WorkerBoard) -> None:
    """One worker: run until SIGTERM or SIGINT, then drain: readiness flips first, then
    in-flight checks finish within the grace period."""
    logs.configure(settings.log_level)
    log = logs.get_logger("sidecar.server.supervisor").bind(worker=worker)
    routes, gateway = settings.route_table(), settings.gateway()
    address = worker_addresses(settings)[worker]
    ledger = Ledger.from_url(settings.redis_url, timeout=settings.redis_timeout_ms / 1000)

    limiter = wiring.rate_limiter(settings, ledger)
    settler = wiring.exact_settler(settings, ledger)
    feed = wiring.decision_feed(settings, ledger)  # the dashboard's stream, if on
    decision_log = logs.DecisionLog(settings.log_level, sink=feed)
    over_http = settings.transport == "http"
    answers = http_transport.HttpAnswers() if over_http else None
    paywall = wiring.paywall(settings, gateway)
    authz = CheckService(
        routes, gateway, ledger, worker, decision_log, limiter, settler, answers, paywall
    )
    # The response phase: a held route's, the Lua filter's calls on the HTTP listener
    # (envoy/phase_call.py); an MCP route's, ext_proc on the gRPC port.
    processor = Processor(routes, gateway, ledger, worker, authz.decisions, settler)
    processes = GrpcProcessor(processor).handler()
    handlers = (processes,) if over_http else (GrpcChecks(authz).handler(), processes)
    server, health = _grpc_server(worker, address, handlers)
    side = side_services.side_port(settings, routes, gateway, ledger, settler, worker)
    if side.topup is not None and settler is not None:
        await side_services.log_durability(log, settler.authorizations.durable)
    handshake = side.handshake
    shaking = asyncio.create_task(handshake.run()) if handshake is not None else None
    zero = await WorkerZero.start(settings, side, board, ledger, gateway) if worker == 0 else None
    await server.start()
    checks = None
    if settings.listens_http:
        host, port = split_host_port(worker_addresses(settings, "listen_authz_http")[worker], "")
        trusted = settings.edge_config().xff_num_trusted_hops
        processing = HttpProcessor(processor)
        checks = await http_transport.serve(authz, host, port, trusted, processing, over_http)
    for service in ("", AUTHZ_SERVICE, PROCESSOR_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    # Everything made so far lives as long as the worker: keep the collector from scanning
    # it again and again (checks allocate fast, and every pass walked all of it).
    gc.freeze()
    board.set(worker, SERVING)
    await _log_started(log, ledger, listen_grpc=address, transport=settings.transport,
        listen_http=settings.listen_http if zero else None, payee=gateway.payee,
        routes=len(routes.routes))  # fmt: skip

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    grace = drain_seconds(settings)
    log.info("sidecar.stopping", grace_seconds=grace)
    side.ready = False
    board.set(worker, DRAINING)
    await health.enter_graceful_shutdown()

    async def stop_checks() -> None:
        if checks is not None:
            await checks.drain(grace)
        await server.stop(grace)  # the response phase (ext_proc) too

    # The checks and the side port's answers (a top-up settling on chain) drain together.
    await asyncio.gather(stop_checks(), *([zero.http.drain(grace)] if zero else []))
    authz.decisions.flush()  # the last checks' lines
    if feed is not None:
        await feed.close()
    if zero is not None:
        await zero.close()
    if shaking is not None:
        shaking.cancel()
    with contextlib.suppress(Exception):
        await ledger.close()
    if settler is not None:
        with contextlib.suppress(Exception):
            await settler.close()
    log.info("sidecar.stopped")


def _grpc_server(
    worker: int, address: str, handlers: tuple[grpc.GenericRpcHandler, ...]
) -> tuple[grpc.aio.Server, HealthServicer]:
    """The worker's gRPC server on its own port: `handlers` (ext_authz over gRPC, the
    response phase) and gRPC health; a port it cannot bind is a config error."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(handlers)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpc: "Failed to bind"
        bound = 0
    if bound == 0:
        raise ConfigError(f"config listen_grpc: worker {worker} cannot listen on {address}")
    return server, health


async def _log_started(log: Any, ledger: Ledger, **facts: Any) -> None:
    """The worker's start line; if Redis cannot be reached, a line saying where and why
    (the worker fails closed with 503 until it can)."""
    unreachable = await ledger.unreachable()
    log.info(
        "sidecar.started",
        pid=os.getpid(),
        redis_url=ledger.url,
        ledger_ready=not unreachable,
        **facts,
    )
    if unreachable:
        log.error("ledger.unavailable", redis_url=ledger.url, cause=unreachable)


@dataclass
class WorkerZero:
    """What worker 0 serves beside its checks: the side port, the probes' port, the admin
    API, settlement and the dashboard (facilities), and the sweep of expired holds."""

    http: SideServer
    probes: SideServer | None
    facilities: Facilities
    sweeper: asyncio.Task[None]
    reconciling: asyncio.Task[None] | None = None  # x402 reconcile on an interval

    @classmethod
    async def start(
        cls,
        settings: Settings,
        side: SidePort,
        board: WorkerBoard,
        ledger: Ledger,
        gateway: Gateway,
    ) -> WorkerZero:
        http = await _start_side_port(settings, side, board)
        probes = None
        if settings.listen_health:
            probes = await _start_side_port(settings, side, board, "listen_health")
        # The admin API and the settlement worker, if configured: one instance each.
        facilities = await start_facilities(settings, ledger, gateway)
        sweeper = asyncio.create_task(sweep_forever(ledger, settings.hold_sweep_seconds))
        return cls(http, probes, facilities, sweeper, _reconciling(settings, ledger))

    async def close(self) -> None:
        """After the drain (the side port's is in serve's)."""
        self.sweeper.cancel()
        if self.reconciling is not None:
            self.reconciling.cancel()
        self.http.close()
        if self.probes is not None:
            self.probes.close()
        await self.facilities.close(SHUTDOWN_GRACE_SECONDS)


def _reconciling(settings: Settings, ledger: Ledger) -> asyncio.Task[None] | None:
    """Worker 0's reconciliation with the chain, where a chain is configured."""
    durability = settings.durability_config()
    interval = durability.reconcile_interval_seconds
    if not interval or not settings.chain_rpc_url or settings.exact_terms() is None:
        return None
    reconciler, chain = wiring.reconciler(settings, ledger)
    blocks = durability.reconcile_blocks
    return asyncio.create_task(reconcile_forever(reconciler, chain, interval, blocks))


async def _start_side_port(
    settings: Settings, side: SidePort, board: WorkerBoard, key: str = "listen_http"
) -> SideServer:
    """The side port (listen_http), or the probes' own port (listen_health: health only)."""
    probes_only = key == "listen_health"

    async def respond(method: str, path: str, headers: Headers) -> AnyReply:
        if probes_only and path not in ("/healthz", "/readyz"):
            return 404, "application/json", b'{"error":"not_found"}'
        if path == TOPUP_PATH and not side.ready:  # draining: finish top-ups, start none
            return 503, "application/json", b'{"error":"shutting_down"}', {"Retry-After": "1"}
        # Ready only when every worker serves: Envoy sends checks to all of them.
        if path == "/readyz" and side.ready and not board.all_serving():
            return 503, "application/json", b'{"status":"workers_starting"}'
        return await side.respond(method, path, headers)

    address = getattr(settings, key)
    host, port = split_host_port(address, key)
    try:
        return await start_http(respond, host, port, settings.side_port_max_connections)
    except OSError as exc:
        raise ConfigError(f"config {key}: cannot listen on {address}: {exc.strerror}") from None


def run_worker(settings: Settings, worker: int, board: WorkerBoard) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(settings, worker, board))
    else:
        uvloop.run(serve(settings, worker, board))


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.board = WorkerBoard(settings.workers)
        self.children: dict[int, int] = {}  # pid → worker index
        self.stopping = False
        self.restarts: deque[float] = deque(maxlen=CRASH_LOOP_RESTARTS)
        self.log = logs.get_logger("sidecar.supervisor")

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)
        for worker in range(self.settings.workers):
            self._spawn(worker)
        failed = False
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if pid not in self.children:
                continue
            worker = self.children.pop(pid)
            if self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.log.error("sidecar.worker_exited", worker=worker, pid=pid, exit_code=code)
            if code == EXIT_CONFIG:  # it said why on stderr; a restart would fail the same way
                failed = True
                self._stop(signal.SIGTERM, None)
                continue
            now = time.monotonic()
            self.restarts.append(now)
            if len(self.restarts) == CRASH_LOOP_RESTARTS and now - self.restarts[0] < (
                CRASH_LOOP_SECONDS
            ):
                self.log.error("sidecar.crash_loop", restarts=CRASH_LOOP_RESTARTS)
                failed = True
                self._stop(signal.SIGTERM, None)
                continue
            self._spawn(worker)
        return 1 if failed else 0

    def _spawn(self, worker: int) -> None:
        self.board.set(worker, STARTING)
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.children[pid] = worker
            return
        code = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            _die_with_parent(parent)
            run_worker(self.settings, worker, self.board)
            code = 0
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            code = EXIT_CONFIG
        except BaseException:  # a worker must never fall back into the supervisor's loop
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            self.log.info("sidecar.stopping", workers=len(self.children))
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _die_with_parent(parent: int) -> None:
    """Linux: a worker gets SIGTERM if the supervisor is killed, so no orphan keeps a port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def listeners(settings: Settings) -> list[tuple[str, str]]:
    """Every (config key, host:port) the sidecar will listen on."""
    bound = [("listen_grpc", address) for address in worker_addresses(settings)]
    if settings.listens_http:
        bound += [("listen_authz_http", a) for a in worker_addresses(settings, "listen_authz_http")]
    bound.append(("listen_http", settings.listen_http))
    if settings.listen_health:
        bound.append(("listen_health", settings.listen_health))
    if settings.listen_admin and (settings.admin_token_file or settings.admin_tls_client_ca_file):
        bound.append(("listen_admin", settings.listen_admin))
    if settings.dashboard_enabled:
        bound.append(("listen_dashboard", settings.listen_dashboard))
    return bound


def refuse_ports_in_use(settings: Settings) -> None:
    """One line naming the port and its key if another process holds it (not a crash loop
    of workers that cannot bind)."""
    for key, address in listeners(settings):
        host, port = split_host_port(address, key)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
                probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"config {key}: port {port} ({address}) is in use by another process"
                ) from None
            reason = exc.strerror or str(exc)
            raise ConfigError(f"config {key}: cannot listen on {address}: {reason}") from None


def run(settings: Settings) -> None:
    """Check everything that can fail once, before forking, so a bad config fails once."""
    logs.configure(settings.log_level)
    routes, gateway = settings.route_table(), settings.gateway()
    check_listener(settings)
    try:  # the URL and its TLS files, before any worker depends on them
        check_url(settings.redis_url)
    except ValueError as exc:
        raise ConfigError(f"config redis_url {redacted(settings.redis_url)}: {exc}") from None
    refuse_ports_in_use(settings)
    wiring.facilitator_endpoints(settings)  # a credentials file unusable: say so once, here
    print_route_table(routes, gateway)
    with metrics.aggregated(settings.workers):  # /metrics sums every worker's samples
        code = Supervisor(settings).run()
    sys.exit(code)
