"""The official x402 stack that `make bench` measures (bench/official.py) really charges:
the official FastAPI middleware, a facilitator and anvil + USDC, paid with what the bench
pre-signs with the official client; with either facilitator the bench puts behind it: the
reference, the official one as its example runs it (bench/reference_facilitator.py), and
`x402 facilitator serve`. Nothing is mocked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench import official, onchain
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, operator, payers
from sidecar.tools.stack import LOOPBACK, Process, free_port, wait_http

PRICE = 1000


@pytest.fixture(scope="module", params=["reference", "project"])
def server(
    request: pytest.FixtureRequest,
    chain: AnvilChain,
    facilitator: FacilitatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    workdir = Path(tmp_path_factory.mktemp("official"))
    reference: Process | None = None
    facilitator_url = facilitator.url
    if request.param == "reference":
        reference_port = free_port()
        reference = onchain.reference_facilitator(chain, workdir, reference_port)
        facilitator_url = f"http://{LOOPBACK}:{reference_port}"
        wait_http(f"{facilitator_url}/health", timeout=120, process=reference)
    port = free_port()
    argv = [sys.executable, "-m", "bench.official", "--facilitator", facilitator_url,
            "--network", chain.network, "--asset", chain.token,
            "--asset-name", chain.token_name, "--asset-version", chain.token_version,
            "--pay-to", operator(chain).address, "--amount", str(PRICE),
            "--port", str(port)]  # fmt: skip
    process = Process("official", argv, workdir / "official.log").start()
    try:
        wait_http(f"http://{LOOPBACK}:{port}/health", timeout=120, process=process)
        yield f"http://{LOOPBACK}:{port}{official.PATH}"
    finally:
        process.stop()
        if reference is not None:
            reference.stop()


def test_a_presigned_payment_is_settled_once(server: str, chain: AnvilChain) -> None:
    challenge = httpx.get(server, timeout=30)
    assert challenge.status_code == 402
    required = official.decode_required(challenge.headers["payment-required"])
    assert [(a.scheme, a.amount, a.asset) for a in required.accepts] == [
        ("exact", str(PRICE), chain.token)
    ]
    payer = payers(chain)[0]
    jobs = official.sign_jobs(required, chain.network, chain.token, [payer.key], PRICE, 2)
    first, second = official.sign_batch(jobs[0])
    assert first != second  # a fresh EIP-3009 nonce each
    paid_to = operator(chain).address
    before = (chain.balance_of(payer.address), chain.balance_of(paid_to))

    paid = httpx.get(server, headers={"PAYMENT-SIGNATURE": first}, timeout=60)
    assert paid.status_code == 200, paid.text
    assert "payment-response" in paid.headers
    assert (chain.balance_of(payer.address), chain.balance_of(paid_to)) == (
        before[0] - PRICE,
        before[1] + PRICE,
    )
    replay = httpx.get(server, headers={"PAYMENT-SIGNATURE": first}, timeout=60)
    assert replay.status_code == 402
    assert chain.balance_of(paid_to) == before[1] + PRICE
