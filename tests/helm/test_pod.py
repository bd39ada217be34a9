"""The rendered pod run as processes (tests/support/pods.py): an external-Redis install
takes a real payment through Envoy, and the in-chart Redis runs as configured."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic, to_decimal
from sidecar.tools.stack import LOOPBACK, find_binary, free_port, free_ports
from tests.support.charts import (
    FULLNAME,
    listed_price,
    render_chart,
    rendered_values,
    run,
)
from tests.support.payers import b64json, funded_payer_at
from tests.support.pods import Pod, grpc_serving, poll, start_redis


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.stop()


# values file → (route to pay, a concrete path of it)
PAID = {
    "external-redis": ("verify", "/api/v1/trade/verify/T-42"),
    "many-routes": ("catalog-sub", "/v2/catalog/sku-1/versions/7"),
    "http": ("verify", "/v1/verify/T-42"),  # checks over ext_authz's http_service
}


@pytest.mark.parametrize("name", list(PAID))
def test_the_rendered_pod_runs_as_processes_and_takes_a_payment(
    name: str, tmp_path: Path, pods: list[Pod]
) -> None:
    values = rendered_values(name).values
    workers = values["sidecar"]["workers"]
    taken: set[int] = set()
    ports = {key: free_port(taken) for key in ("envoy", "admin", "probe", "app", "http", "health")}
    ports["redis"] = free_port(taken)
    grpc_port = free_ports(workers, taken)  # worker i listens on grpcPort + i
    authz_http_port = free_ports(workers, taken)  # and, with transport http, authzHttpPort + i
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
        f"envoy.probePort={ports['probe']}",
        "--set",
        f"app.port={ports['app']}",
        "--set",
        f"sidecar.httpPort={ports['http']}",
        "--set",
        f"sidecar.healthPort={ports['health']}",
        # The drain below: the endpoint's time to leave the Services is not waited for here.
        "--set",
        "sidecar.drain.endpointSeconds=0",
        "--set",
        f"sidecar.grpcPort={grpc_port}",
        "--set",
        f"sidecar.authzHttpPort={authz_http_port}",
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
        pod.wait_ready(container)  # the kubelet's probes: the health port, Envoy's /ready
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
            (spec.get("method", "*"), spec["path"], listed_price(spec, values, a), a)
            for spec in values["routes"].values()
            for a in [spec.get("asset", values["defaultAsset"])]
        }

        challenge = client.request(method, path)
        assert challenge.status_code == 402, challenge.text
        invoice = challenge.json()["x402"]
        assert (invoice["amount"], invoice["asset"]) == (price, asset)

        ledger_url = (
            f"redis://:{password}@{LOOPBACK}:{ports['redis']}/0"
            if password
            else f"redis://{LOOPBACK}:{ports['redis']}/0"
        )
        wallet = asyncio.run(funded_payer_at(ledger_url, atomic * 3, asset))
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

        # A retry of the same proof (a lost answer): served again with the same receipt,
        # charged nothing (docs/protocol.md §13).
        replay = client.request(method, path, headers=header)
        assert replay.status_code == 200, replay.text
        assert replay.headers["x-payment-response"] == paid.headers["x-payment-response"]
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
    # Every worker took its checks over the values' transport.
    started = [
        json.loads(line) for line in sidecar.log().splitlines() if '"sidecar.started"' in line
    ]
    assert len(started) == workers
    assert {entry["transport"] for entry in started} == {values["sidecar"]["transport"]}

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
    drain(pod, ports, (method, path), wallet)


def drain(pod: Pod, ports: dict[str, int], request: tuple[str, str], wallet: Identity) -> None:
    """The pod stops: the x402 container's preStop, as rendered, fails Envoy's /ready
    (the kubelet's readiness probe) and drains its listeners; a paid request still arrives
    and is answered, told to close its connection; then the sidecar's SIGTERM, a clean exit."""
    x402 = pod.rendered.container("x402", pod.spec)
    hook = x402["lifecycle"]["preStop"]["exec"]["command"]
    stopping = run([find_binary(hook[0]), *hook[1:]])
    assert stopping.returncode == 0 and not stopping.stdout, stopping.stdout + stopping.stderr
    ready = httpx.get(f"http://{LOOPBACK}:{ports['probe']}/ready", timeout=5)
    assert ready.status_code == 503
    assert httpx.get(f"http://{LOOPBACK}:{ports['probe']}/stats", timeout=5).status_code == 404
    method, path = request
    with httpx.Client(base_url=f"http://{LOOPBACK}:{ports['envoy']}", timeout=10) as client:
        invoice = client.request(method, path).json()["x402"]
        header = {"X-Payment": protocol.encode_header(protocol.sign_proof(invoice, wallet))}
        paid = client.request(method, path, headers=header)
    assert paid.status_code == 200, paid.text
    assert paid.headers["connection"] == "close"
    sidecar = pod.processes["x402"]
    sidecar.popen.send_signal(signal.SIGTERM)
    assert sidecar.popen.wait(30) == 0
    assert '"sidecar.stopped"' in sidecar.log()


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
        # maxmemory below the container's memory limit: Redis refuses writes before the
        # kernel would kill it.
        limit = statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limit["memory"] == "512Mi"
        assert client.config_get("maxmemory") == {"maxmemory": str(512 * 2**20 * 75 // 100)}
        client.set("x402:probe", "1")
    finally:
        client.close()
    # The password is on no command line (`ps` shows every process's to the whole node).
    server = pod.processes["redis"].popen.pid
    assert password not in Path(f"/proc/{server}/cmdline").read_text()
    data = pod.mounts(rendered.container("redis", pod.spec))["/data"]
    assert any(path.name.startswith("appendonly") for path in data.rglob("*"))
