"""Values: invalid ones fail with a message that names the key; the switches (config
checksum, ServiceMonitor, autoscaling) render what they say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.server.config import Settings
from tests.support import grafana
from tests.support.charts import (
    CHART,
    EVERY_RENDER,
    FULLNAME,
    KUBE_VERSION,
    RELEASE,
    helm,
    render_chart,
    rendered_values,
)

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
        "ports: app.port, envoy.port, envoy.adminPort, envoy.probePort, sidecar.httpPort,",
    ),
    "unknown transport": (
        "sidecar: {transport: websocket}",
        [],
        "sidecar.transport: sidecar.transport must be one of the following",
    ),
    "authz http port out of range": (
        "sidecar: {authzHttpPort: 70000}",
        [],
        "sidecar.authzHttpPort: Must be less than or equal to 65535",
    ),
    "http workers on the grpc workers' ports": (
        "sidecar: {transport: http, workers: 2, authzHttpPort: 9002}",
        [],
        "(with transport http or a held route, authzHttpPort..authzHttpPort+workers-1 too) share",
    ),
    "http workers past the last port": (
        "sidecar: {transport: http, workers: 2, authzHttpPort: 65535}",
        [],
        "sidecar.authzHttpPort: 2 workers need ports 65535..65536",
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
    "existing service without the selector of its pods": (
        "existingService: {name: orders-api}",
        [],
        "existingService.podSelector: the labels of the service's pods",
    ),
    "existing service and an app container": (
        "existingService: {name: orders-api, podSelector: {app: orders}}\n"
        "app: {image: {repository: orders}}",
        [],
        "existingService.name: the gateway fronts an existing Service, so it runs no app",
    ),
    "existing service name not a DNS name": (
        "existingService: {name: Orders_API, podSelector: {app: orders}}",
        [],
        "existingService.name: Does not match pattern",
    ),
    "existing service port out of range": (
        "existingService: {name: orders-api, port: 0, podSelector: {app: orders}}",
        [],
        "existingService.port: Must be greater than or equal to 1",
    ),
    "existing service selector not a label map": (
        "existingService: {name: orders-api, podSelector: {app: [orders]}}",
        [],
        "existingService.podSelector.app: Invalid type. Expected: string, given: array",
    ),
    "negative rate limit": (
        "sidecar: {rateLimits: {payerPerSecond: -1}}",
        [],
        "sidecar.rateLimits.payerPerSecond: Must be greater than or equal to 0",
    ),
    "unknown rate limit": (
        "sidecar: {rateLimits: {perMinute: 5}}",
        [],
        "Additional property perMinute is not allowed",
    ),
    "ip burst of the wrong type": (
        "sidecar: {rateLimits: {ipBurst: '10'}}",
        [],
        "sidecar.rateLimits.ipBurst: Invalid type. Expected: integer, given: string",
    ),
    "hold sweep of zero": (
        "sidecar: {holdSweepSeconds: 0}",
        [],
        "sidecar.holdSweepSeconds: Must be greater than or equal to 1",
    ),
    "a typo in durability's money_in": (
        "sidecar: {durability: {moneyIn: of}}",
        [],
        "sidecar.durability.moneyIn: sidecar.durability.moneyIn must be one of the following",
    ),
    "an unknown retries key": (
        "sidecar: {retries: {redeliveries: 3}}",
        [],
        "Additional property redeliveries is not allowed",
    ),
    "negative settlement interval": (
        "sidecar: {settlement: {intervalSeconds: -5}}",
        [],
        "sidecar.settlement.intervalSeconds: Must be greater than or equal to 0",
    ),
    "empty settlement batches": (
        "sidecar: {settlement: {batchSize: 0}}",
        [],
        "sidecar.settlement.batchSize: Must be greater than or equal to 1",
    ),
    "settlement max age of zero": (
        "sidecar: {settlement: {maxAgeSeconds: 0}}",
        [],
        "sidecar.settlement.maxAgeSeconds: Must be greater than or equal to 1",
    ),
    "settlement lease of zero": (
        "sidecar: {settlement: {leaseSeconds: 0}}",
        [],
        "sidecar.settlement.leaseSeconds: Must be greater than or equal to 1",
    ),
    "anchor file outside the chart's volume": (
        "sidecar: {settlement: {anchorFile: /etc/anchors.jsonl}}",
        [],
        "sidecar.settlement.anchorFile: Does not match pattern",
    ),
    "admin switch of the wrong type": (
        "sidecar: {admin: {enabled: 'yes'}}",
        [],
        "sidecar.admin.enabled: Invalid type. Expected: boolean, given: string",
    ),
    "admin port out of range": (
        "sidecar: {admin: {port: 70000}}",
        [],
        "sidecar.admin.port: Must be less than or equal to 65535",
    ),
    "admin port on another port of the pod": (
        "sidecar: {admin: {enabled: true, port: 9000}}",
        [],
        "ports: app.port, envoy.port, envoy.adminPort, envoy.probePort, sidecar.httpPort,",
    ),
    "admin API off loopback without TLS": (
        "sidecar: {admin: {enabled: true, bindAddress: 0.0.0.0}}",
        [],
        "sidecar.admin.bindAddress: 0.0.0.0 is reachable from the network; set "
        "sidecar.admin.tls.existingSecret",
    ),
    "metrics scraped by anyone": (
        "serviceMonitor: {enabled: true}",
        [],
        "networkPolicy.metricsFrom: with serviceMonitor.enabled, name who may scrape",
    ),
    "an anchor log that dies with the pod": (
        "sidecar: {settlement: {anchorFile: /var/lib/x402/anchors.jsonl}}",
        [],
        "sidecar.settlement.anchorVolume: the anchor log must outlive the pod",
    ),
    "a grace period shorter than the drain": (
        "terminationGracePeriodSeconds: 30\nexact: {onchain: {USDF: {network: 'eip155:8453', "
        "token: '0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913', name: USD Coin, version: '2', "
        "decimals: 6}}}",
        [],
        "terminationGracePeriodSeconds: 30 is shorter than the drain (57s: preStop 5s, the "
        "sidecar's drain 32s, the upstream's 15s, 5s to exit)",
    ),
    "redis maxmemory without a memory limit": (
        "redis: {internal: {resources: {limits: {memory: null}}}}",
        [],
        "redis.internal.resources.limits.memory: required",
    ),
    "alerts without the metrics": (
        "prometheusRule: {enabled: true}",
        [],
        "prometheusRule.enabled: its alerts read the metrics serviceMonitor.enabled scrapes",
    ),
    "admin token key not a key name": (
        "sidecar: {admin: {tokenKey: 'admin token'}}",
        [],
        "sidecar.admin.tokenKey: Does not match pattern",
    ),
    "unknown admin key": (
        "sidecar: {admin: {token: abc}}",
        [],
        "Additional property token is not allowed",
    ),
    "grafana dashboard switch as a string": (
        "grafanaDashboard: {enabled: 'yes'}",
        [],
        "grafanaDashboard.enabled: Invalid type. Expected: boolean, given: string",
    ),
    "unknown grafana dashboard key": (
        "grafanaDashboard: {enabled: true, folder: payments}",
        [],
        "Additional property folder is not allowed",
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
    result = helm(
        "template", RELEASE, str(CHART), "-f", str(path), *KUBE_VERSION, *EVERY_RENDER, *extra
    )
    assert result.returncode != 0, f"{case} rendered:\n{result.stdout[:2000]}"
    assert message in result.stderr
    assert "hunter2" not in result.stderr


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


def test_the_grafana_dashboard_configmap_is_off_by_default_and_loadable() -> None:
    name = f"{FULLNAME}-grafana-dashboard"
    assert not rendered_values("default").has("ConfigMap", name)
    rendered = render_chart(
        "default",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=payments",
    )
    configmap = rendered.find("ConfigMap", name)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "payments"}
    assert json.loads(configmap["data"]["x402-sidecar.json"]) == grafana.load()


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


def test_rate_limits_settlement_holds_and_the_admin_api_reach_the_sidecar_config() -> None:
    rendered = render_chart(
        "default",
        "--set",
        "sidecar.rateLimits.payerPerSecond=5",
        "--set",
        "sidecar.rateLimits.ipBurst=20",
        "--set",
        "sidecar.holdSweepSeconds=2",
        "--set",
        "sidecar.settlement.intervalSeconds=30",
        "--set",
        "sidecar.settlement.batchSize=500",
        "--set",
        "sidecar.admin.enabled=true",
        "--set",
        "sidecar.settlement.anchorFile=/var/lib/x402/x402-anchors.jsonl",
        "--set",
        "sidecar.settlement.anchorVolume.persistentVolumeClaim.claimName=x402-anchors",
    )
    config = rendered.sidecar_config
    settings = Settings.from_mapping(config, env={})
    assert (settings.rate_limit_payer_per_second, settings.rate_limit_ip_burst) == (5, 20)
    assert (settings.hold_sweep_seconds, settings.settle_interval_seconds) == (2, 30)
    assert (settings.settle_batch_size, settings.anchor_file) == (
        500,
        "/var/lib/x402/x402-anchors.jsonl",
    )
    assert settings.listen_admin == "127.0.0.1:8999"
    x402 = rendered.container("x402")
    mounts = {m["mountPath"]: m["name"] for m in x402["volumeMounts"]}
    assert mounts["/var/lib/x402"] == "x402-data"
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["x402-data"]["persistentVolumeClaim"] == {"claimName": "x402-anchors"}
    token_dir = settings.admin_token_file.rsplit("/", 1)[0]
    assert mounts[token_dir] == "x402-admin"
    token = rendered.secret_values()[f"{FULLNAME}-admin"]["admin.token"]
    assert len(token.encode()) >= 16
    assert "x402-admin" not in {port["name"] for port in x402["ports"]}  # loopback only
    # Off by default: no admin listener, no token Secret; no anchor log, no volume for it.
    default = rendered_values("default")
    assert "listen_admin" not in default.sidecar_config
    assert default.sidecar_config["anchor_file"] == ""
    assert "x402-data" not in {v["name"] for v in default.pod["volumes"]}
    assert not default.has("Secret", f"{FULLNAME}-admin")


def test_retries_and_durability_reach_the_sidecar_config() -> None:
    rendered = render_chart(
        "default",
        "--set",
        "sidecar.retries.redeliveryLimit=0",
        "--set",
        "sidecar.retries.replayPerPayer=8",
        "--set",
        "sidecar.durability.moneyIn=off",
        "--set",
        "sidecar.durability.replicas=1",
    )
    settings = Settings.from_mapping(rendered.sidecar_config, env={})
    assert (settings.redelivery_limit, settings.replay_per_payer) == (0, 8)
    assert settings.replay_settings().body_max_bytes == 32768
    durability = settings.durability_config()
    assert (durability.money_in, durability.replicas, durability.timeout_ms) == ("off", 1, 1000)


def test_previous_signing_keys_are_mounted_and_configured() -> None:
    rendered = render_chart(
        "default", "--set", "secrets.previousSigningKeyKeys={signing-1.key,signing-0.key}"
    )
    settings = Settings.from_mapping(rendered.sidecar_config, env={})
    secrets_dir = settings.signing_key_file.rsplit("/", 1)[0]
    assert settings.previous_signing_key_files == (
        f"{secrets_dir}/previous-0.key",
        f"{secrets_dir}/previous-1.key",
    )
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == "x402-secrets"]
    assert volume["secret"]["items"][2:] == [
        {"key": "signing-1.key", "path": "previous-0.key"},
        {"key": "signing-0.key", "path": "previous-1.key"},
    ]
    assert "previous_signing_key_files" not in rendered_values("default").sidecar_config


def test_facilitators_and_their_credentials_are_mounted_and_configured() -> None:
    facilitators: list[dict[str, Any]] = [
        {
            "url": "https://api.cdp.coinbase.com/platform/v2/x402",
            "cdpApiKeySecret": {"name": "cdp-api-key", "key": "cdp_api_key.json"},
        },
        {
            "url": "https://facilitator.example/x402",
            "headersSecret": {"name": "facilitator-headers", "key": "headers"},
        },
        {"url": "http://10.0.0.7:4022"},
    ]
    rendered = render_chart(
        "exact",
        "--set-json",
        f"exact.facilitators={json.dumps(facilitators)}",
        "--set",
        "exact.supportedSeconds=30",
    )
    config = rendered.sidecar_config
    directory = "/etc/x402/facilitators"
    assert config["facilitators"] == [
        {"url": facilitators[0]["url"], "cdp_api_key_file": f"{directory}/0/cdp_api_key.json"},
        {"url": facilitators[1]["url"], "headers_file": f"{directory}/1/headers"},
        {"url": facilitators[2]["url"]},
    ]
    assert "facilitator_url" not in config and config["facilitator_supported_seconds"] == 30
    specs = Settings.from_mapping(config, env={}).facilitator_specs()  # the sidecar reads it
    assert [spec.url for spec in specs] == [f["url"] for f in facilitators]
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["x402-facilitator-0"]["secret"] == {
        "secretName": "cdp-api-key",
        "optional": False,
        "defaultMode": 0o440,
        "items": [{"key": "cdp_api_key.json", "path": "cdp_api_key.json"}],
    }
    assert volumes["x402-facilitator-1"]["secret"]["items"] == [
        {"key": "headers", "path": "headers"}
    ]
    assert "x402-facilitator-2" not in volumes
    mounts = {m["name"]: m for m in rendered.container("x402")["volumeMounts"]}
    assert (
        mounts["x402-facilitator-0"]["mountPath"],
        mounts["x402-facilitator-1"]["mountPath"],
    ) == (
        f"{directory}/0",
        f"{directory}/1",
    )
    default = rendered_values("exact").sidecar_config  # one facilitator_url, as before
    assert default["facilitator_url"] == "https://facilitator.example/x402"
    assert "facilitators" not in default


def test_the_channels_values_reach_the_sidecar_config() -> None:
    """Self-serve channels: on by default with the chart's bounds; the values set them."""
    default = Settings.from_mapping(rendered_values("default").sidecar_config, env={})
    terms = default.channel_terms()
    assert terms is not None and (terms.min_deposit, terms.max_ttl_seconds) == (10_000, 86400)
    rendered = render_chart(
        "default",
        "--set-string",
        "channels.minDeposit=2,channels.maxDeposit=50",
        "--set",
        "channels.maxTtlSeconds=600",
    )
    custom = Settings.from_mapping(rendered.sidecar_config, env={}).channel_terms()
    assert custom is not None
    assert (custom.min_deposit, custom.max_deposit, custom.max_ttl_seconds) == (
        2_000_000,
        50_000_000,
        600,
    )
    off = render_chart("default", "--set", "channels.selfServe=false")
    assert Settings.from_mapping(off.sidecar_config, env={}).channel_terms() is None


def test_the_paywall_values_reach_the_sidecar_config() -> None:
    """The paywall: on by default; the values name the app and turn it off, per route too."""
    default = Settings.from_mapping(rendered_values("default").sidecar_config, env={})
    assert default.paywall_settings().enabled is True
    rendered = render_chart(
        "default",
        "--set-string",
        "paywall.appName=Atlas,paywall.appLogo=https://atlas.example/logo.svg",
        "--set",
        "paywall.enabled=false",
        "--set",
        "routes.atlas.method=GET,routes.atlas.path=/atlas,routes.atlas.price=0.25",
        "--set",
        "routes.atlas.paywall=true",
    )
    paywall = Settings.from_mapping(rendered.sidecar_config, env={}).paywall_settings()
    assert (paywall.enabled, paywall.app_name) == (False, "Atlas")
    assert paywall.app_logo == "https://atlas.example/logo.svg"
    assert paywall.on_for("atlas") and not paywall.on_for("other")


def test_the_in_chart_redis_has_waitaof_and_its_aof_on() -> None:
    """Top-ups are durable on the in-chart Redis (docs/redis.md): Redis >= 7.2 or Valkey
    (WAITAOF), appendonly yes."""
    rendered = render_chart("internal-redis")
    statefulset = next(
        doc
        for doc in rendered.docs
        if doc["kind"] == "StatefulSet" and "redis" in doc["metadata"]["name"]
    )
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    name, _, tag = container["image"].rpartition(":")
    version = tuple(int(part) for part in tag.split("-")[0].split(".")[:2])
    assert version >= ((8, 0) if name.endswith("valkey") else (7, 2)), container["image"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
