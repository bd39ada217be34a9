"""A rendered pod run as local processes, as the kubelet would start it (tests/helm/test_pod.py)."""

from __future__ import annotations

import functools
import os
import posixpath
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.tools.stack import LOOPBACK, Process, find_binary, wait_http
from tests.support.charts import Rendered, run

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ is a literal $."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(sub, text)


def grpc_serving(port: int, service: str) -> bool:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def poll(check: Callable[[], bool], what: str, process: Process, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.popen.poll() is not None:
            raise AssertionError(
                f"{process.name} exited while waiting for {what}:\n" + process.log()[-3000:]
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + process.log()[-3000:])
        time.sleep(0.05)


def exec_ok(argv: list[str], env: Mapping[str, str]) -> bool:
    return run(argv, env=env).returncode == 0


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Pod:
    """Runs a rendered pod's containers as local processes, as the kubelet would start them:
    volumes written under `root/<container>/<mountPath>`, env resolved from the rendered
    Secrets (and the ones the chart expects to exist) with $(VAR) expansion, and the
    command, args and ports exactly as rendered. Kubernetes mounts volumes at their
    mountPath; here each in-pod path is translated to its copy under root, and a path that
    no volumeMount covers fails the test, so a wiring mistake cannot hide."""

    rendered: Rendered
    spec: Mapping[str, Any]
    root: Path
    existing_secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    mounted: set[str] = field(default_factory=set)

    def secret(self, name: str) -> Mapping[str, str]:
        rendered = self.rendered.secret_values()
        if name in rendered:
            return rendered[name]
        assert name in self.existing_secrets, f"Secret {name} is neither rendered nor given"
        return self.existing_secrets[name]

    def volume_files(self, volume: Mapping[str, Any]) -> tuple[dict[str, str], int]:
        if "configMap" in volume:
            source = volume["configMap"]
            data: Mapping[str, str] = self.rendered.find("ConfigMap", source["name"])["data"]
        elif "secret" in volume:
            source = volume["secret"]
            data = self.secret(source["secretName"])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            # The kubelet writes a Secret's files as root, readable by the pod's fsGroup
            # (0440); here the process owns them, so the group's read is the owner's: the
            # secrets rule (core/identity.py check_private) sees what a pod would allow.
            mode = source.get("defaultMode", 0o644)
            folded = (mode | (mode & 0o070) << 3) & 0o700
            return {item["path"]: data[item["key"]] for item in items}, folded
        else:
            assert set(volume) == {"name", "emptyDir"}, f"unsupported volume {volume}"
            return {}, 0o777
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        return {item["path"]: data[item["key"]] for item in items}, source.get("defaultMode", 0o644)

    def container_root(self, name: str) -> Path:
        return self.root / name

    def mounts(self, container: Mapping[str, Any]) -> dict[str, Path]:
        return {
            m["mountPath"]: self.container_root(container["name"]) / m["mountPath"].lstrip("/")
            for m in container.get("volumeMounts", [])
        }

    def mount_volumes(self, container: Mapping[str, Any]) -> None:
        """Once per container, like the kubelet before the container starts."""
        if container["name"] in self.mounted:
            return
        self.mounted.add(container["name"])
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            target = self.mounts(container)[mount["mountPath"]]
            target.mkdir(parents=True, exist_ok=True)
            files, mode = self.volume_files(volumes[mount["name"]])
            for relative, content in files.items():
                path = target / relative
                path.write_text(content)
                path.chmod(mode)

    def host_path(self, container: Mapping[str, Any], path: str) -> str:
        path = posixpath.normpath(path)
        mounts = self.mounts(container)
        covering = [m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")]
        assert covering, f"{container['name']} uses {path}, which no volumeMount provides"
        mount = max(covering, key=len)
        return str(mounts[mount] / path[len(mount) :].lstrip("/"))

    def env(self, container: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secret(ref["name"])[ref["key"]]
        return {k: self.host_path(container, v) if v.startswith("/") else v for k, v in env.items()}

    def argv(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
        words = [
            expand(w, env) for w in [*container.get("command", []), *container.get("args", [])]
        ]
        assert words, f"{container['name']}: no command in the manifest"
        return [find_binary(words[0])] + [
            self.host_path(container, w) if w.startswith("/") else w for w in words[1:]
        ]

    def start(self, name: str, argv: list[str] | None = None) -> Process:
        container = self.rendered.container(name, self.spec)
        self.root.mkdir(parents=True, exist_ok=True)
        self.mount_volumes(container)
        env = self.env(container)
        process = Process(name, argv or self.argv(container, env), self.root / f"{name}.log", env)
        self.processes[name] = process.start()
        return process

    def port(self, container: Mapping[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)

    def wait_ready(self, name: str) -> None:
        """Run the container's startup, liveness and readiness probes until they pass."""
        container = self.rendered.container(name, self.spec)
        process = self.processes[name]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if not probe:
                continue
            if "httpGet" in probe:
                port = self.port(container, probe["httpGet"]["port"])
                wait_http(f"http://{LOOPBACK}:{port}{probe['httpGet']['path']}", 30, process)
            elif "tcpSocket" in probe:
                port = self.port(container, probe["tcpSocket"]["port"])
                poll(functools.partial(tcp_open, port), f"{name} tcp {port}", process)
            elif "grpc" in probe:
                check = functools.partial(
                    grpc_serving, probe["grpc"]["port"], probe["grpc"].get("service", "")
                )
                poll(check, f"{name} gRPC health", process)
            else:
                command = probe["exec"]["command"]
                argv = [find_binary(command[0]), *command[1:]]
                env = {**os.environ, **self.env(container)}
                poll(functools.partial(exec_ok, argv, env), f"{name} exec probe", process)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


def start_redis(directory: Path, port: int, password: str | None) -> Process:
    """The Redis an external-Redis install points at."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        find_binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    process = Process(
        "redis", argv + (["--requirepass", password] if password else []), directory / "redis.log"
    ).start()
    client = redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=1)

    def pong() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    poll(pong, "redis", process)
    client.close()
    return process
