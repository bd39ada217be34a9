"""The chart lints strictly, every manifest validates offline against the Kubernetes
versions it supports, its Envoy config passes `envoy --mode validate`, and NOTES.txt
explains the product without printing a secret."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from sidecar.server.envoy import phase_call
from sidecar.tools.stack import find_binary
from tests.support.charts import (
    CHART,
    EVERY_RENDER,
    FULLNAME,
    RELEASE,
    VALUES,
    Rendered,
    helm,
    ordered_routes,
    render_chart,
    run,
)

# The oldest Kubernetes the chart supports (kubeVersion: the preStop sleep action is on by
# default from 1.30) and the newest one kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Kinds from CRDs: kubernetes-validate has no schema for them and says so with a WARN.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
}


@pytest.mark.parametrize("name", list(VALUES))
def test_helm_lint_strict(name: str) -> None:
    path = VALUES[name]
    args = ["--strict", str(CHART), *(["-f", str(path)] if path else []), *EVERY_RENDER]
    result = helm("lint", *args)
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
    envoy_validate(rendered, tmp_path)


@pytest.mark.parametrize("name", [name for name in VALUES if name != "http"])
def test_every_values_file_over_http_passes_envoy_validate(name: str, tmp_path: Path) -> None:
    envoy_validate(render_chart(name, "--set", "sidecar.transport=http"), tmp_path)


@pytest.mark.parametrize("replay_per_payer", ["64", "0"])
def test_the_held_routes_phase_call_passes_envoy_validate(
    replay_per_payer: str, tmp_path: Path
) -> None:
    """The held routes' response phase, the Lua filter's call (server/envoy/phase_call.py),
    with and without kept responses (the body it sends up to the edge's buffer, or none)."""
    rendered = render_chart("exact", "--set", f"sidecar.retries.replayPerPayer={replay_per_payer}")
    envoy = rendered.configmap["envoy.yaml"]
    keep = "local keep = 1" if replay_per_payer != "0" else "local keep = 0"
    assert phase_call.NAME in envoy and keep in envoy
    envoy_validate(rendered, tmp_path)


def envoy_validate(rendered: Rendered, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(rendered.configmap["envoy.yaml"])
    result = run(
        [find_binary("envoy"), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout


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
    # The two ways a default install can hurt: one ledger pod, and receipts never settled.
    single = "WARNING: the ledger is ONE Redis pod"
    assert (single in notes) == rendered.values["redis"]["internal"]["enabled"]
    settling = rendered.values["sidecar"]["settlement"]["intervalSeconds"]
    assert ("WARNING: settlement is off" in notes) == (not settling)
    routes = list(ordered_routes(rendered.values["routes"]).values())
    for route in routes[:10]:  # the first ten, then "… and N more"
        price = route.get("price") or (
            "MCP tools"
            if "mcp" in route
            else f"{route['unit_price']} per {route.get('unit', 'unit')}"
        )
        assert f"{route.get('method', '*')} {route['path']}  {price}" in notes
    assert (f"and {len(routes) - 10} more" in notes) == (len(routes) > 10)
    for data in rendered.secret_values().values():
        for value in data.values():
            assert value not in notes
            assert base64.b64encode(value.encode()).decode() not in notes
