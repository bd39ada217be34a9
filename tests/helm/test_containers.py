"""The chart in real containers: the images built here (Dockerfile, helm/images/) on a Debian
base made with debootstrap, the rendered chart played with `podman kube play`, and payments
through the pod's own Envoy (tests/support/containers.py)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http.utils import decode_payment_response_header

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.server.supervisor import SHUTDOWN_GRACE_SECONDS
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, operator, payers
from sidecar.tools.stack import LOOPBACK, free_port
from tests.support.charts import CHART, render_chart
from tests.support.containers import (
    Cluster,
    Images,
    have_podman,
    images,
    podman,
    publish,
    run_in_image,
    wait_ready,
    wait_until,
    which_in_image,
)
from tests.support.exact import sign_exact
from tests.support.payers import b64json
from tests.support.pods import start_redis

pytestmark = pytest.mark.containers

VALUES = CHART / "ci" / "podman-values.yaml"


@pytest.fixture(scope="module")
def built() -> Images:
    reason = have_podman()
    if reason:
        pytest.fail(reason, pytrace=False)
    return images()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    played = Cluster(tmp_path / "cluster")
    played.start()
    try:
        yield played
    finally:
        played.down()


def test_the_image_builds_runs_x402_and_holds_no_compiler_pip_cache_or_sources(
    built: Images,
) -> None:
    version = run_in_image(built.sidecar, "x402", "--version")
    assert version.strip() == "x402, version 0.1.0"
    # No compiler, no build tools; pip's cache and the build's sources stay in the build stage.
    tools = which_in_image(built.sidecar, ["cc", "gcc", "c++", "g++", "make", "ld", "x402"])
    assert tools.pop("x402") == "/opt/x402/bin/x402"
    assert tools == dict.fromkeys(tools), tools
    # Every file of the image's filesystem (not /proc, /sys, /dev): no pip cache, and none
    # of the build's sources (the package is only in the virtualenv's site-packages).
    script = (
        "import json, os\n"
        "found = {'uid': os.getuid(), 'pip_cache': [], 'sources': []}\n"
        "for top, dirs, files in os.walk('/'):\n"
        "    if top == '/':\n"
        "        dirs[:] = [d for d in dirs if d not in ('proc', 'sys', 'dev')]\n"
        "    if top.endswith('/.cache/pip') or top.startswith('/tmp/pip-'):\n"
        "        found['pip_cache'].append(top)\n"
        "    for name in files:\n"
        "        if name in ('pyproject.toml', 'Dockerfile'):\n"
        "            found['sources'].append(os.path.join(top, name))\n"
        "    for name in dirs:\n"
        "        path = os.path.join(top, name)\n"
        "        if path == '/src' or name == 'sidecar' and 'site-packages' not in top:\n"
        "            found['sources'].append(path)\n"
        "print(json.dumps(found))\n"
    )
    found = json.loads(run_in_image(built.sidecar, "python3", "-c", script))
    assert found == {"uid": 65532, "pip_cache": [], "sources": []}


def fund(cluster: Cluster, x402: str, wallet: Identity, amount: str) -> None:
    """`kubectl exec ... -c x402 -- x402 payer ... --admin`: through the pod's admin API,
    with the token the chart's Secret mounts."""
    admin = ["--admin", "127.0.0.1:8999", "--admin-token-file", "/etc/x402/admin/admin.token"]
    once = ["--idempotency-key", f"test-fund-{wallet.public_key}"]
    for argv in (
        ["x402", "payer", "register", wallet.public_key, *admin],
        ["x402", "payer", "credit", wallet.public_key, amount, "--asset", "USDF", *once, *admin],
    ):
        result = cluster.exec(x402, *argv)
        assert result.returncode == 0, result.stdout + result.stderr


def pay(client: httpx.Client, path: str, wallet: Identity) -> tuple[httpx.Response, dict[str, str]]:
    challenge = client.get(path)
    assert challenge.status_code == 402, challenge.text
    header = {
        "X-Payment": protocol.encode_header(protocol.sign_proof(challenge.json()["x402"], wallet))
    }
    return client.get(path, headers=header), header


def assert_paid(paid: httpx.Response, wallet: Identity, keys: dict[str, str]) -> dict[str, Any]:
    assert paid.status_code == 200, paid.text
    assert paid.json()["payer"] == wallet.public_key
    receipt: dict[str, Any] = b64json(paid.headers["x-payment-response"])
    assert protocol.verify_receipt(receipt, keys)
    return receipt


def test_the_chart_plays_in_podman_takes_payments_and_fails_closed(
    built: Images, cluster: Cluster
) -> None:
    fullname = f"x402c-{os.urandom(3).hex()}"
    port = free_port()
    rendered = render_chart(
        "default", "-f", str(VALUES), *built.helm_args(), "--set", f"fullnameOverride={fullname}"
    )
    deployment = rendered.find("Deployment", fullname)
    publish(deployment, "envoy", "http", port)
    cluster.play(rendered.docs)
    gateway, ledger = f"{fullname}-pod-0", f"{fullname}-redis"
    wait_ready(cluster, ledger, rendered.find("StatefulSet", ledger)["spec"]["template"]["spec"])
    spec = deployment["spec"]["template"]["spec"]
    wait_ready(cluster, gateway, spec)
    x402 = cluster.container(gateway, "x402")

    with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=10) as client:
        document = client.get("/.well-known/x402").json()
        keys = {key["kid"]: key["public_key"] for key in document["keys"]}
        wallet = Identity.generate()
        fund(cluster, x402, wallet, "1")

        paid, header = pay(client, "/reports/r-1", wallet)
        receipt = assert_paid(paid, wallet, keys)
        assert (receipt["amount"], receipt["balance"]) == ("0.25", "0.75")
        replay = client.get("/reports/r-1", headers=header)  # redelivered, same receipt
        assert replay.headers["x-payment-response"] == paid.headers["x-payment-response"]

        def decided() -> bool:
            for line in cluster.logs(x402).splitlines():
                if '"authz.decision"' in line:
                    entry = json.loads(line)
                    if entry["decision"] == "allow" and entry["payer"] == wallet.public_key:
                        return True
            return False

        wait_until(decided, "the allow decision in the x402 container's log", lambda: "", 20)

        # The sidecar's settlement loop batches the receipt and appends the batch's
        # manifest to the anchor file on the pod's volume.
        def anchored() -> bool:
            read = cluster.exec(x402, "cat", "/var/lib/x402/x402-anchors.jsonl")
            return read.returncode == 0 and bool(read.stdout.strip())

        wait_until(anchored, "a settled batch in the anchor file", lambda: cluster.logs(x402), 30)

        # The sidecar container dies: Envoy fails closed with the JSON envelope, and the
        # container comes back by the pod's restart policy.
        state = cluster.inspect(x402)["State"]
        restarts = cluster.inspect(x402)["RestartCount"]
        os.kill(int(state["Pid"]), 9)
        statuses: list[int] = []
        refusal: httpx.Response | None = None
        for _ in range(400):
            answer = client.get("/reports/r-2")
            statuses.append(answer.status_code)
            if answer.status_code == 503 and refusal is None:
                refusal = answer
            if refusal is not None and answer.status_code == 402:
                break
        assert 200 not in statuses, statuses
        assert set(statuses) <= {402, 503}, statuses
        assert refusal is not None, f"no 503 while the sidecar was down: {statuses}"
        assert refusal.headers["content-type"] == "application/json"
        assert refusal.headers["retry-after"] == "1"
        assert refusal.json()["error"] == "authz_unavailable"
        wait_until(
            lambda: cluster.inspect(x402)["RestartCount"] > restarts,
            "the x402 container's restart",
            lambda: cluster.logs(x402),
        )
        wait_ready(cluster, gateway, spec)

        # Payments resume, against the same ledger.
        again, _ = pay(client, "/reports/r-3", wallet)
        receipt = assert_paid(again, wallet, keys)
        assert receipt["balance"] == "0.5"


def test_alongside_an_existing_service_the_gateway_pod_pays_a_route_of_another_pod(
    built: Images, cluster: Cluster
) -> None:
    fullname = f"x402a-{os.urandom(3).hex()}"
    service, port = f"{fullname}-orders", free_port()
    # "The existing service": a pod of its own on the same network, found by its name as
    # a Service's would be, listening on all its addresses.
    labels = {"app": service}
    existing: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service, "labels": labels},
        "spec": {
            "containers": [
                {
                    "name": "orders",
                    "image": built.sidecar,
                    "imagePullPolicy": "Never",
                    "command": ["x402", "upstream", "--host", "0.0.0.0", "--port", "8080"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
                }
            ]
        },
    }
    rendered = render_chart(
        "default",
        "-f",
        str(VALUES),
        *built.helm_args(),
        "--set",
        f"fullnameOverride={fullname}",
        "--set",
        f"existingService.name={service}",
        "--set",
        "existingService.port=8080",
        "--set",
        f"existingService.podSelector.app={service}",
    )
    deployment = rendered.find("Deployment", fullname)
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["envoy", "x402"]
    # The policy keeps the service's port to the gateway: it selects the existing pods and
    # admits the gateway's pods alone (podman enforces no NetworkPolicy; the cluster does).
    policy = rendered.find("NetworkPolicy", f"{fullname}-upstream")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    [source] = rule["from"]
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert set(source) == {"podSelector"}

    cluster.play([existing])
    wait_ready(cluster, service, existing["spec"])
    publish(deployment, "envoy", "http", port)
    cluster.play(rendered.docs)
    gateway, ledger = f"{fullname}-pod-0", f"{fullname}-redis"
    wait_ready(cluster, ledger, rendered.find("StatefulSet", ledger)["spec"]["template"]["spec"])
    wait_ready(cluster, gateway, spec)
    x402 = cluster.container(gateway, "x402")

    with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=10) as client:
        keys = {k["kid"]: k["public_key"] for k in client.get("/.well-known/x402").json()["keys"]}
        wallet = Identity.generate()
        fund(cluster, x402, wallet, "1")
        paid, header = pay(client, "/reports/r-9", wallet)
        receipt = assert_paid(paid, wallet, keys)
        assert receipt["balance"] == "0.75"
        # The other pod answered, with what the gateway asserted about the payment.
        assert paid.json()["service"] == "demo-upstream"
        assert paid.json()["amount"] == "0.25"
        replay = client.get("/reports/r-9", headers=header)  # redelivered, same receipt
        assert replay.headers["x-payment-response"] == paid.headers["x-payment-response"]
        free = client.get("/not/priced")
        assert (free.status_code, free.json()["service"]) == (200, "demo-upstream")


# -- a SIGTERM in the middle of an `exact` settle -----------------------------------------

EXACT_PATH, EXACT_PRICE = "/reports/r-exact", 10_000  # 0.01 USDF = 0.01 USDC


def exact_values(
    chain: AnvilChain, facilitator: FacilitatorProcess, redis_port: int
) -> tuple[list[str], int]:
    """The podman values with `exact` on this chain, the pod on the host's network (the
    chain and the facilitator listen on its loopback), every port a free one, and the
    ledger an external Redis there too (no name to resolve on the host's network)."""
    taken: set[int] = set()  # the kernel may hand a released port out again
    keys = ["envoy.port", "envoy.adminPort", "envoy.probePort", "app.port"]
    keys += ["sidecar.httpPort", "sidecar.healthPort", "sidecar.grpcPort", "sidecar.authzHttpPort"]
    ports = {key: free_port(taken) for key in keys}
    onchain = {
        "network": chain.network,
        "token": chain.token,
        "name": chain.token_name,
        "version": chain.token_version,
        "decimals": chain.decimals,
    }
    pairs = [
        *(f"{key}={port}" for key, port in ports.items()),
        "sidecar.admin.enabled=false",  # its dashboard's fixed loopback port: not on a host
        "redis.internal.enabled=false",
        f"redis.url=redis://{LOOPBACK}:{redis_port}/0",
        f"exact.facilitatorUrl={facilitator.url}",
        f"exact.payTo={operator(chain).address}",
        f"exact.chainRpcUrl={chain.rpc_url}",
        "routes.report.path=/reports/{report_id}",
    ]
    args = [arg for pair in pairs for arg in ("--set", pair)]
    args += ["--set-string", "routes.report.price=0.01"]
    args += ["--set-json", f"exact.onchain={json.dumps({'USDF': onchain})}"]
    return args, ports["envoy.port"]


def test_a_sigterm_during_an_exact_settle_answers_the_settled_request_before_exiting(
    built: Images,
    cluster: Cluster,
    chain: AnvilChain,
    facilitator: FacilitatorProcess,
    tmp_path: Path,
) -> None:
    """The pod's sidecar gets SIGTERM while a paid request's settle waits for its block:
    the request is still answered 200 with the settled transaction and the receipt, and
    the sidecar exits only after. (Its drain used to be 5 s: the payer's money moved and
    the answer was a 503.)"""
    redis_port = free_port()
    ledger = start_redis(tmp_path / "redis", redis_port, None)
    try:
        fullname = f"x402t-{os.urandom(3).hex()}"
        values, port = exact_values(chain, facilitator, redis_port)
        rendered = render_chart(
            "default",
            "-f",
            str(VALUES),
            *built.helm_args(),
            "--set",
            f"fullnameOverride={fullname}",
            *values,
        )
        deployment = rendered.find("Deployment", fullname)
        spec = deployment["spec"]["template"]["spec"]
        spec["hostNetwork"] = True  # the chain, the facilitator and the ledger are the host's
        cluster.play(rendered.docs)
        gateway = f"{fullname}-pod-0"
        wait_ready(cluster, gateway, spec)
        x402 = cluster.container(gateway, "x402")
        restarts = cluster.inspect(x402)["RestartCount"]
        response = asyncio.run(pay_exact_across_a_sigterm(chain, cluster, x402, port))
    finally:
        ledger.stop()

    assert response.status_code == 200, response.text
    settled = decode_payment_response_header(response.headers["payment-response"])
    assert settled.success is True and settled.payer == payers(chain)[0].address
    assert chain.w3.eth.get_transaction_receipt(settled.transaction)["status"] == 1  # type: ignore[arg-type]
    assert settled.amount == "10000"  # atomic units of the token
    receipt = b64json(response.headers["x-payment-response"])
    assert (receipt["scheme"], receipt["amount"]) == ("exact", "0.01")
    # And then the sidecar finished its drain and exited (the pod restarts it here).
    wait_until(
        lambda: (
            '"sidecar.stopped"' in cluster.logs(x402)
            or cluster.inspect(x402)["RestartCount"] > restarts
        ),
        "the sidecar's exit after its drain",
        lambda: cluster.logs(x402),
    )
    stopped = [line for line in cluster.logs(x402).splitlines() if '"sidecar.stopped"' in line]
    assert stopped, cluster.logs(x402)


async def pay_exact_across_a_sigterm(
    chain: AnvilChain, cluster: Cluster, x402: str, port: int
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}", timeout=90) as http:
        signature, _ = await sign_exact(chain, http, EXACT_PATH, payers(chain)[0], EXACT_PRICE)
        await asyncio.to_thread(chain.automine, False)
        try:
            pending = asyncio.ensure_future(
                http.get(EXACT_PATH, headers={"PAYMENT-SIGNATURE": signature})
            )
            for _ in range(400):  # the facilitator's settle transaction, sent, not mined
                if await asyncio.to_thread(chain.pending_transactions) or pending.done():
                    break
                await asyncio.sleep(0.05)
            assert not pending.done(), (await pending).text
            await asyncio.to_thread(podman, "kill", "--signal", "TERM", x402)
            await asyncio.to_thread(
                wait_until,
                lambda: '"sidecar.stopping"' in cluster.logs(x402),
                "the sidecar's SIGTERM",
                lambda: cluster.logs(x402),
            )
            # Past the 5 s the sidecar used to give what it had in flight.
            await asyncio.sleep(SHUTDOWN_GRACE_SECONDS + 1)
            assert not pending.done(), (await pending).text
            await asyncio.to_thread(chain.mine)
        finally:
            await asyncio.to_thread(chain.automine, True)
        return await pending
