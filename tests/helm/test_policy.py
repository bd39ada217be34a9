"""The pod's hardening: restricted containers, a Service that reaches only Envoy, the
Redis password only through Secrets, generated keys valid and rolled by checksum."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from sidecar.core.identity import Identity
from tests.support.charts import (
    FULLNAME,
    Rendered,
    render_chart,
    rendered_values,
)


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
