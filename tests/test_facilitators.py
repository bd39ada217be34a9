"""Facilitators with credentials, in order, and the handshake, through the real stack:
`x402 facilitator serve --require-bearer-file` (the official facilitator behind a bearer
token, as hosted facilitators are) on anvil, Envoy, the sidecar and Redis; paid by the
official x402 client. And PyPI x402-conformance's facilitator checks against it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http.clients import x402HttpxClient

from sidecar.core.identity import Identity, write_secret
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    facilitator_account,
    official_client,
    payers,
)
from sidecar.tools.stack import LOOPBACK, Stack, free_port
from tests.support.exact import balances, sign_exact
from tests.support.payers import pay_direct
from tests.support.serving import serve, serve_config, serving, wait_log

PAID = "/api/paid"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
ROUTES = {"paid": {"method": "GET", "path": PAID, "price": "0.01", "description": "paid"}}
TOKEN = "f4c1l1t4t0r-b34r3r-t0k3n"


@pytest.fixture(scope="module")
def guarded(
    chain: AnvilChain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FacilitatorProcess]:
    """`x402 facilitator serve --require-bearer-file`: 401 without the token."""
    workdir = tmp_path_factory.mktemp("guarded")
    write_secret(workdir / "bearer", TOKEN + "\n")
    served = FacilitatorProcess(chain, workdir, bearer_file=workdir / "bearer").start()
    yield served
    served.stop()


def headers_file(directory: Path, token: str = TOKEN) -> Path:
    path = directory / "facilitator.headers"
    path.unlink(missing_ok=True)
    write_secret(path, f"# the guarded facilitator's token\nAuthorization: Bearer {token}\n")
    return path


def facilitating(
    chain: AnvilChain, facilitator: FacilitatorProcess, facilitators: list[dict[str, str]]
) -> dict[str, Any]:
    """exact_settings with a `facilitators` list in place of facilitator_url."""
    settings = exact_settings(chain, facilitator, facilitators=facilitators)
    del settings["facilitator_url"]
    return settings


@pytest.fixture(scope="module")
def failover(
    chain: AnvilChain, guarded: FacilitatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Path]]:
    """First a facilitator nobody listens at, then the guarded one with its token."""
    path = headers_file(tmp_path_factory.mktemp("credentials"))
    listed = [
        {"url": f"http://{LOOPBACK}:{free_port()}"},
        {"url": guarded.url, "headers_file": str(path)},
    ]
    with Stack(ROUTES, settings=facilitating(chain, guarded, listed)) as running:
        yield running, path


@pytest.fixture
async def http(failover: tuple[Stack, Path]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=failover[0].url, timeout=60) as client:
        yield client


def sidecar_events(stack: Stack, event: str) -> list[dict[str, Any]]:
    found = []
    for line in stack.processes["sidecar"].log().splitlines():
        if line.startswith("{") and (entry := json.loads(line)).get("event") == event:
            found.append(entry)
    return found


def served_paths(stack: Stack) -> list[str]:
    """The paid route's requests that reached the service (not the harness's probe of /)."""
    return [entry["path"] for entry in stack.upstream_requests() if entry["path"] == PAID]


# -- with credentials, after a facilitator that cannot be reached ---------------------------


async def test_with_credentials_payments_settle_through_the_next_facilitator(
    failover: tuple[Stack, Path], chain: AnvilChain, guarded: FacilitatorProcess
) -> None:
    stack, _ = failover
    payer = payers(chain)[0]
    before = balances(chain, payer.address)
    async with x402HttpxClient(official_client(chain, payer, PRICE), timeout=60) as client:
        response = await client.get(stack.url + PAID)
    assert response.status_code == 200, response.text
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    dead = stack.settings["facilitators"][0]["url"].removeprefix("http://")
    # Said once, as it went down: the settle then asked the guarded one first.
    (skipped,) = sidecar_events(stack, "facilitator.not_reached")
    assert (skipped["facilitator"], skipped["status"], skipped["path"]) == (
        dead,
        "unreachable",
        "/verify",
    )
    # The handshake: the dead one said once, the guarded one's signers taken from its answer.
    (unanswered,) = sidecar_events(stack, "facilitator.unanswered")
    assert unanswered["facilitator"] == dead
    (supported,) = sidecar_events(stack, "facilitator.supported")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as plain:
        answer = await plain.get(f"{guarded.url}/supported")
    host = guarded.url.removeprefix("http://")
    assert supported["signers"] == {host: answer.json()["signers"]}
    assert answer.json()["signers"]["eip155:*"] == [facilitator_account(chain).address]
    assert TOKEN not in stack.processes["sidecar"].log()  # never logged


async def test_a_refused_credential_is_503_names_the_facilitator_and_charges_nothing(
    failover: tuple[Stack, Path], chain: AnvilChain, http: httpx.AsyncClient,
    guarded: FacilitatorProcess,
) -> None:  # fmt: skip
    """The headers file is read again when it changes: a wrong token is refused (401) by
    the only facilitator reached, the right one pays the same authorization after."""
    stack, path = failover
    payer = payers(chain)[1]
    header, _ = await sign_exact(chain, http, PAID, payer, PRICE)
    before, served = balances(chain, payer.address), len(served_paths(stack))
    path.write_text("Authorization: Bearer a-wrong-token\n")  # mode 0600 kept
    response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert (response.status_code, response.json()["error"]) == (503, "facilitator_unavailable")
    assert response.headers["retry-after"] == "1"
    assert "a-wrong-token" not in response.text
    line = stack.wait_decisions(lambda d: d.get("facilitator_status") == 401)[0]
    assert (line["decision"], line["status"], line["reason"]) == (
        "deny",
        503,
        "facilitator_unavailable",
    )
    assert line["facilitator"] == guarded.url.removeprefix("http://")
    assert balances(chain, payer.address) == before  # never a charge
    assert len(served_paths(stack)) == served  # never a free pass
    assert "a-wrong-token" not in stack.processes["sidecar"].log()
    headers_file(path.parent)
    paid = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert paid.status_code == 200, paid.text
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


# -- without credentials --------------------------------------------------------------------


async def test_without_credentials_exact_is_503_and_prepaid_is_served(
    chain: AnvilChain, guarded: FacilitatorProcess
) -> None:
    settings = facilitating(chain, guarded, [{"url": guarded.url}])
    with Stack(ROUTES, settings=settings) as stack:  # ready: prepaid does not wait on it
        (refused,) = sidecar_events(stack, "facilitator.unanswered")
        assert "HTTP 401" in refused["cause"]
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            payer = payers(chain)[2]
            header, _ = await sign_exact(chain, http, PAID, payer, PRICE)
            before = balances(chain, payer.address)
            response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
            assert (response.status_code, response.json()["error"]) == (
                503,
                "facilitator_unavailable",
            )
            line = stack.wait_decisions(lambda d: d.get("status") == 503)[0]
            assert (line["facilitator"], line["facilitator_status"]) == (
                guarded.url.removeprefix("http://"),
                401,
            )
            assert served_paths(stack) == []
            exposition = (await http.get(f"{stack.sideport_url}/metrics")).text
            host = guarded.url.removeprefix("http://")
            counted = f'x402_facilitator_not_reached_total{{facilitator="{host}",status="401"}}'
            assert counted in exposition, exposition
            wallet = Identity.generate()
            await stack.fund(wallet.public_key, "1")
            prepaid = await http.get(PAID, headers=pay_direct(stack, wallet, f"GET {PAID}", "0.01"))
            assert prepaid.status_code == 200
            assert served_paths(stack) == [PAID]
        assert balances(chain, payer.address) == before


# -- the handshake and start-up -------------------------------------------------------------


def test_a_facilitator_without_the_network_keeps_the_sidecar_unready(
    chain: AnvilChain, facilitator: FacilitatorProcess, tmp_path: Path
) -> None:
    settings = exact_settings(chain, facilitator)
    settings["onchain"]["USDF"]["network"] = "eip155:8453"  # Base: not this facilitator's
    config = serve_config(tmp_path, redis_url=f"redis://{LOOPBACK}:{free_port()}/0", **settings)
    readyz = f"http://{serve_settings(config)['listen_http']}/readyz"
    with serving(config):
        line = wait_log(config, "facilitator.unsupported")
        host = facilitator.url.removeprefix("http://")
        assert line["level"] == "error"
        assert f"the facilitator {host} does not support exact on eip155:8453" in line["reason"]
        assert f"exact on {chain.network}" in line["reason"]  # what it does support
        answer = ready_answer(readyz)
    assert answer["status"] == "facilitator_unsupported"
    assert answer["reason"] == line["reason"]


def serve_settings(config: Path) -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(config.read_text())
    return loaded


def ready_answer(url: str) -> dict[str, Any]:
    """/readyz's answer once the side port serves (the handshake has answered by then)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code != 503 or response.json()["status"] != "facilitator_pending":
                answer: dict[str, Any] = response.json()
                assert response.status_code == 503
                return answer
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.1)


@pytest.mark.parametrize("problem", ["missing", "readable"])
def test_an_unusable_credentials_file_stops_start_up_naming_it(
    chain: AnvilChain, facilitator: FacilitatorProcess, tmp_path: Path, problem: str
) -> None:
    path = tmp_path / "facilitator.headers"
    if problem == "readable":
        headers_file(tmp_path).chmod(0o644)
    listed = [{"url": facilitator.url, "headers_file": str(path)}]
    config = serve_config(tmp_path, **facilitating(chain, facilitator, listed))
    result = serve(config)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "facilitators[0].headers_file: " in result.stderr and str(path) in result.stderr
    assert TOKEN not in result.stderr


# -- x402-conformance -----------------------------------------------------------------------


def conformance(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """PyPI x402-conformance's live facilitator checks (S0-S4, GET /supported)."""
    return subprocess.run(
        [sys.executable, "-m", "x402conf", "live", "--fail-on-error", url],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_x402_conformance_facilitator_checks_pass(
    facilitator: FacilitatorProcess, guarded: FacilitatorProcess
) -> None:
    run = conformance(facilitator.url)
    assert run.returncode == 0, run.stdout + run.stderr
    credential = {
        "X402C_FACILITATOR_AUTHORIZATION": f"Bearer {TOKEN}",
        "X402C_FACILITATOR_AUTH_HOST": LOOPBACK,
    }
    run = conformance(guarded.url, **credential)
    assert run.returncode == 0, run.stdout + run.stderr
    assert TOKEN not in run.stdout + run.stderr
    refused = conformance(guarded.url)  # without it: S0 fails on the 401
    assert refused.returncode == 1 and "401" in refused.stdout + refused.stderr
