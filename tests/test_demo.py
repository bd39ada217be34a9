"""`x402 demo`, the newcomer's first minute: run it as they would, check what it says."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console

from sidecar.agent.auth import X402Auth, receipt_of
from sidecar.agent.wallet import Wallet
from sidecar.tools import demo
from sidecar.tools.stack import Stack

X402 = str(Path(sys.executable).parent / "x402")  # the console script pip installed
CHECKS = [
    "price list", "free route", "agent wallet", "402 challenge", "signed proof", "paid 200",
    "verified receipt", "replay refused", "direct payment", "max_amount guard",
    "budget guard", "decision log", "ledger", "refund", "metered charge",
]  # fmt: skip


def test_x402_demo_exits_0_and_reports_every_step() -> None:
    result = subprocess.run(
        [X402, "demo"], capture_output=True, text=True, timeout=120, check=False
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for check in CHECKS:
        assert f"✓ {check}" in out, check
    assert "✗" not in out
    # The facts it reports, in the order it shows them.
    facts = [
        "← 402 payment_required: GET /api/v1/agent/pay-api/atlas costs 0.25 USDF",
        "→ retry with X-Payment",
        "← 200 from the service",
        "✓ verified receipt — rcpt_",
        "← 402 nonce_reused",
        "GET /api/v1/trade/verify/T-1001 → 200, 1 request, paid 0.01 USDF, receipt verified",
        "refused guard max_amount: 5 USDF is more than the 1 allowed per request",
        "refused guard budget: 0.25 USDF is more than the 0.2395 left",
        '"event": "authz.decision"',
        "✓ decision log — free, payment_required, paid, nonce_reused, paid, paid",
        "✓ ledger — balance 9.7395 USDF",
        "GET /api/v1/data/rows?limit=37 → 500 (the service failed), charged 0 of 0.1 held",
        "✓ refund",
        "GET /api/v1/data/rows → 200, 37 rows: charged 0.037 of 0.1 USDF held",
        "POST /api/v1/llm/generate → 200, 120 tokens: charged 0.0012 of 0.04 USDF held",
        "✓ metered charge — 37 rows x 0.001 + 120 tokens x 0.00001 = 0.0382 USDF",
        f"All {len(CHECKS)} steps behaved as expected.",
    ]
    positions = [out.find(fact) for fact in facts]
    assert -1 not in positions, [f for f, p in zip(facts, positions, strict=True) if p < 0]
    assert positions == sorted(positions)
    assert "Traceback" not in result.stderr


def test_the_demo_exits_non_zero_when_a_step_misbehaves() -> None:
    # The same story against a gateway that prices the atlas call differently.
    routes = {**demo.ROUTES, "atlas": {**demo.ROUTES["atlas"], "price": "0.30"}}
    out = io.StringIO()
    with Stack(routes) as stack:
        status = demo.Demo(stack, Console(file=out, width=110)).run()
    assert status == 1
    text = out.getvalue()
    assert "✗ 402 challenge" in text and "✗ ledger" in text
    assert "✓ replay refused" in text  # the other steps still ran
    assert "steps misbehaved" in text


def test_x402_demo_serve_keeps_the_stack_up_and_stops_cleanly_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [X402, "demo", "--serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops everything" in line for line in lines):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        gateway = re.search(r"X402_GATEWAY=(\S+)", text)
        key_file = re.search(r"X402_WALLET_FILE=(\S+)", text)
        redis = re.search(r"REDIS_URL=(redis://\S+)", text)
        assert gateway and key_file and redis, text
        assert "x402 pay $X402_GATEWAY/api/v1/agent/pay-api/atlas" in text
        assert "X402Auth(Wallet.from_env(" in text

        wallet = Wallet.from_file(key_file.group(1))
        with httpx.Client(auth=X402Auth(wallet, strict=True)) as client:
            response = client.get(f"{gateway.group(1)}/api/v1/agent/pay-api/atlas")
        receipt = receipt_of(response)
        assert response.status_code == 200 and receipt is not None and receipt.verified
        assert receipt.balance == "99.75"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        host, port = gateway.group(1).removeprefix("http://").split(":")
        with socket.socket() as probe:  # Envoy is gone
            assert probe.connect_ex((host, int(port))) != 0
        assert not Path(key_file.group(1)).exists()  # and its temporary directory
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
