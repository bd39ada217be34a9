"""docs/guides/*.md, executed: every code block of each guide, in order, as it is written,
against a running gateway (and chain); yaml blocks are config files the sidecar loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import lanes
import pytest
import yaml

from sidecar.server.config import Settings

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def world() -> Iterator[lanes.World]:
    with lanes.start(lanes.SPECS["guides"]) as running:
        yield running


def environment(world: lanes.World) -> dict[str, str]:
    gateway = world.gateways["api"]
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "X402_GATEWAY": gateway.url,
        "X402_CONFIG": gateway.config,
        "X402_GATEWAY_KEY": gateway.key,
        "X402_WALLET": world.agent_key,
        "X402_PAYER": world.wallet().public_key,
        "X402_EVM_KEY": world.evm_key,
    }


def run_guide(name: str, world: lanes.World, workdir: Path) -> str:
    """Run every block of docs/guides/NAME.md in `workdir`; their output, joined."""
    text = (GUIDES / f"{name}.md").read_text(encoding="utf-8")
    blocks = BLOCK.findall(text)
    assert blocks and text.count("```") == 2 * len(blocks), "unbalanced code fences"
    env, outputs = environment(world), []
    for language, code in blocks:
        if language == "yaml":  # a config file: named on its first line, and valid
            first = code.splitlines()[0]
            assert first.startswith("# "), f"a yaml block names its file: {first!r}"
            (workdir / first[2:].strip()).write_text(code)
            Settings.from_mapping(yaml.safe_load(code), env={})
            continue
        assert language in ("sh", "python"), f"a block that no test runs: {language!r}"
        argv = ["bash", "-euo", "pipefail", "-c", code]
        if language == "python":
            argv = [sys.executable, "-c", code]
        done = subprocess.run(
            argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, f"{language} block failed:\n{code}\n{done.stdout}{done.stderr}"
        outputs.append(done.stdout)
    return "".join(outputs)


def test_the_providers_guide(world: lanes.World, tmp_path: Path) -> None:
    api, payer = world.gateways["api"], world.wallet().public_key
    before = api.balance(payer)
    out = run_guide("providers", world, tmp_path)
    assert "GET /api/v1/data/rows 0.1 row" in out
    assert (tmp_path / "envoy.yaml").is_file() and "\n5\n" in out  # five priced routes
    assert api.balance(payer) - before == 10_000_000  # the retried credit counted once


def test_the_agents_guide(world: lanes.World, tmp_path: Path) -> None:
    agent = world.wallet()
    assert agent.evm is not None
    usdc = world.usdc(agent.evm.address)
    out = run_guide("agents", world, tmp_path)
    assert "refused: max_amount" in out and "refused: budget after spending 0.02" in out
    assert "direct=True: [200]" in out and "direct=False: [402, 200]" in out
    assert "spent 0.0015" in out and "refunded 0.9985" in out
    # Two top-ups of 1 USDC (x402 topup, then auto_topup), paid from the agent's EVM key.
    assert usdc - world.usdc(agent.evm.address) == 2_000_000


def test_the_auditors_guide(world: lanes.World, tmp_path: Path) -> None:
    from sidecar.agent import X402Auth

    with httpx.Client(auth=X402Auth(world.wallet())) as http:  # receipts to audit
        for trade in ("A-1", "A-2"):
            url = f"{world.gateways['api'].url}/api/v1/trade/verify/{trade}"
            http.get(url).raise_for_status()
    out = run_guide("auditors", world, tmp_path)
    assert re.search(r"OK: \d+ receipts in \d+ batches verify", out)
    assert "FAIL:" in out  # the tampered bundle
    assert "/api/v1/trade/verify/A-2 -> leaf" in out


def test_the_humans_guide(world: lanes.World, tmp_path: Path) -> None:
    out = run_guide("humans", world, tmp_path)
    assert "browser: 402 text/html; charset=utf-8" in out
    assert "curl:    402 application/json" in out
    assert out.rstrip().endswith("1")  # the page's 402 carries PAYMENT-REQUIRED
    assert (tmp_path / "paywall.yaml").is_file()


def test_the_mcp_guide(tmp_path: Path) -> None:
    with lanes.start(lanes.SPECS["mcp"]) as mcp_world:
        api, payer = mcp_world.gateways["api"], mcp_world.wallet().public_key
        before = api.balance(payer)
        out = run_guide("mcp", mcp_world, tmp_path)
        assert "get_weather 0.01" in out and "echo free" in out
        assert "paid: True 10000 atomic" in out and "receipt: rcpt_" in out
        assert before - api.balance(payer) == 10_000
