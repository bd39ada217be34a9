"""The ledger over TLS (issue #30): `rediss://` with the CA and a client certificate from
files, on the pipelined hot path and redis-py alike, against a redis-server started with
TLS on loopback; a wrong CA refuses with a line naming the URL (no password) and why."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.core.identity import Identity
from sidecar.tools.stack import Stack
from tests.support.cli import ROOT
from tests.support.payers import funded_payer_at, pay_invoice
from tests.support.routes import ENVOY_ROUTES, ROUTES
from tests.support.serving import serve_config, serving, wait_log
from tests.support.tls import redis_tls_files

ATLAS = "/api/v1/agent/pay-api/atlas"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return redis_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_stack(tls_files: Path) -> Iterator[Stack]:
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, redis_tls=tls_files) as running:
        yield running


async def pay_atlas(stack: Stack) -> None:
    """A payer funded through the stack's ledger URL pays once through Envoy."""
    wallet = await funded_payer_at(stack.redis_url, 1_000_000)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        challenge = await http.get(ATLAS)
        assert challenge.status_code == 402
        paid = await http.get(ATLAS, headers=pay_invoice(challenge, wallet))
        assert paid.status_code == 200, paid.text
        ready = await http.get(stack.sideport_url + "/readyz")
        assert ready.status_code == 200
    assert await stack.balance(wallet.public_key) == 750_000


def wrong_ca_url(stack: Stack) -> str:
    """The stack's ledger URL with a password, and a CA that did not sign Redis's cert."""
    assert stack.redis_tls is not None
    url = stack.redis_url.replace("rediss://", "rediss://:s3cret-pw@")
    return url.replace(str(stack.redis_tls / "ca.crt"), str(stack.redis_tls / "other.crt"))


async def test_the_sidecar_pays_through_a_ledger_over_tls(tls_stack: Stack) -> None:
    assert tls_stack.redis_url.startswith("rediss://")
    await pay_atlas(tls_stack)


async def test_the_sidecar_pays_through_a_redis_cluster_over_tls(tls_files: Path) -> None:
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, redis_tls=tls_files, redis_cluster=3) as cluster:
        assert cluster.redis_url.startswith("rediss+cluster://")
        await pay_atlas(cluster)


def test_a_wrong_ca_refuses_naming_the_url_and_the_cause(tls_stack: Stack, tmp_path: Path) -> None:
    url = wrong_ca_url(tls_stack)
    config = serve_config(tmp_path, redis_url=url, routes=ROUTES)
    with serving(config):
        line = wait_log(config, "ledger.unavailable")
        ready = httpx.get(f"http://{line_host(config)}/readyz", timeout=5)
    assert ready.status_code == 503  # fail closed
    assert line["redis_url"] == url.replace("s3cret-pw", "***")
    assert "CERTIFICATE_VERIFY_FAILED" in line["cause"] and "127.0.0.1" in line["cause"]
    logs = config.with_suffix(".out").read_text() + config.with_suffix(".err").read_text()
    assert "s3cret-pw" not in logs

    # The operator's CLI says the same in one line.
    payer = Identity.generate().public_key
    cli = subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", "payer", "balance", payer, "--redis", url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1, cli.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in cli.stderr and ":***@127.0.0.1" in cli.stderr
    assert "s3cret-pw" not in cli.stderr


def line_host(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["listen_http"])
