"""`x402 pay URL`: curl-like, body on stdout, receipt and balance on stderr, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.core.identity import Identity
from sidecar.tools.stack import Stack

X402 = str(Path(sys.executable).parent / "x402")
ROUTES = {
    "atlas": {"method": "GET", "path": "/api/v1/agent/pay-api/atlas", "price": "0.25"},
    "deep": {"method": "POST", "path": "/api/v1/agent/pay-api/atlas/deep", "price": "5"},
}


@pytest.fixture(scope="module")
def gateway() -> Iterator[Stack]:
    with Stack(ROUTES) as running:
        yield running


async def x402(
    *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("X402_WALLET")}
    return await asyncio.to_thread(
        subprocess.run, [X402, *args], input=stdin, capture_output=True, timeout=60,
        env={**clean, **(env or {})}, check=False,
    )  # fmt: skip


async def test_pay_prints_the_body_and_reports_receipt_and_balance(
    gateway: Stack, tmp_path: Path
) -> None:
    agent = Identity.generate()
    agent.save(tmp_path / "agent.key")
    await gateway.fund(agent.public_key, "10")
    url = f"{gateway.url}/api/v1/agent/pay-api/atlas?q=1"
    result = await x402("pay", "--wallet", str(tmp_path / "agent.key"), "-H", "X-Trace: t1", url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)  # stdout is the body and nothing else
    assert body["payer"] == agent.public_key and body["method"] == "GET"
    err = result.stderr.decode()
    assert "HTTP 200 OK · paid 0.25 USDF" in err
    assert "(verified, GET /api/v1/agent/pay-api/atlas)" in err
    assert "balance 9.75 USDF" in err

    # POST with a body from stdin, the wallet from the environment, the challenge flow.
    result = await x402(
        "pay", "-X", "POST", "-d", "@-", "--challenge", "--max-amount", "5",
        f"{gateway.url}/api/v1/agent/pay-api/atlas/deep",
        env={"X402_WALLET": agent.seed_text}, stdin=b'{"topic": "agents"}',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "POST"
    assert "balance 4.75 USDF" in result.stderr.decode()
    assert await gateway.balance(agent.public_key) == 4_750_000


async def test_pay_refusals_are_one_readable_line(gateway: Stack, tmp_path: Path) -> None:
    agent = Identity.generate()
    await gateway.fund(agent.public_key, "0.1")
    env = {"X402_WALLET": agent.seed_text}
    atlas = f"{gateway.url}/api/v1/agent/pay-api/atlas"

    capped = await x402("pay", "--max-amount", "0.10", atlas, env=env)
    assert capped.returncode == 1 and capped.stdout == b""
    assert capped.stderr.decode() == (
        "error: guard max_amount: 0.25 USDF is more than the 0.1 allowed per request\n"
    )
    poor = await x402("pay", atlas, env=env)
    assert poor.returncode == 1
    assert json.loads(poor.stdout)["error"] == "insufficient_funds"  # the body, as curl would
    assert poor.stderr.decode().splitlines() == [
        "error: HTTP 402 Payment Required: insufficient_funds: the balance does not cover "
        "this request (balance 0.1)",
        "next: the balance (0.1) does not cover this request: add credit with `x402 topup "
        f"--amount AMOUNT {gateway.url}` with an EVM key, or X402Auth(auto_topup=...), or "
        "ask the gateway's operator (`x402 payer credit`)",
    ]
    bad_amount = await x402("pay", "--max-amount", "1e3", atlas, env=env)
    no_wallet = await x402("pay", atlas)
    unreachable = await x402("pay", "http://127.0.0.1:9/x", env=env)
    for result, message in (
        (bad_amount, "error: max_amount: amount '1e3' is not a non-negative decimal"),
        (no_wallet, "error: no wallet: set X402_WALLET or X402_WALLET_FILE"),
        (unreachable, "error: GET http://127.0.0.1:9/x: ConnectError"),
    ):
        err = result.stderr.decode()
        assert result.returncode == 1 and err.startswith(message), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert await gateway.balance(agent.public_key) == 100_000


async def test_pay_with_an_unknown_key_says_what_to_do(gateway: Stack, tmp_path: Path) -> None:
    from sidecar.agent.evm import EvmKey

    stranger = Identity.generate()
    evm = EvmKey.generate()
    evm.save(tmp_path / "agent.evm")
    atlas = f"{gateway.url}/api/v1/agent/pay-api/atlas"
    plain = await x402("pay", atlas, env={"X402_WALLET": stranger.seed_text})
    lines = plain.stderr.decode().splitlines()
    assert plain.returncode == 1 and lines[0].startswith("error: HTTP 402 Payment Required: ")
    assert lines[1].startswith(f"next: this key ({stranger.public_key}) has no account")
    assert f"x402 payer register {stranger.public_key}" in lines[1]
    with_evm = await x402(
        "pay", "--evm-key", str(tmp_path / "agent.evm"), atlas,
        env={"X402_WALLET": stranger.seed_text},
    )  # fmt: skip
    assert with_evm.stderr.decode().splitlines()[1] == (
        f"next: buy credit with this wallet's EVM key ({evm.address}): x402 topup "
        f"--amount AMOUNT {gateway.url}"
    )


async def test_pay_timing_out_after_paying_says_it_may_have_been_charged(gateway: Stack) -> None:
    agent = Identity.generate()
    await gateway.fund(agent.public_key, "10")
    env = {"X402_WALLET": agent.seed_text}
    slow = f"{gateway.url}/api/v1/agent/pay-api/atlas?sleep=3"
    result = await x402("pay", "--timeout", "1", slow, env=env)
    err = result.stderr.decode()
    assert result.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: GET {slow}: ReadTimeout after the payment was sent: 0.25 USDF")
    assert "may have been charged" in err
    assert await gateway.balance(agent.public_key) == 9_750_000
    # The command it prints re-sends the same proof: charged at most once, and it says so.
    command = err.partition("again): ")[2].strip()
    assert command.startswith("x402 pay -X GET -H 'X-Payment: ")
    proof = command.split("'")[1]
    again = await x402("pay", "-H", proof, slow.partition("?")[0], env=env)
    assert again.returncode == 1
    # ... for another request (no query): a conflict naming its charge (protocol.md §13).
    assert json.loads(again.stdout)["error"] == "payment_identifier_conflict"
    assert json.loads(again.stdout)["receipt_id"]
    assert await gateway.balance(agent.public_key) == 9_750_000
