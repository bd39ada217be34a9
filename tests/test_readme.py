"""The README's promises, executed: the two first commands and the five-line agent."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.core.identity import Identity
from sidecar.tools.stack import Stack

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- agent-snippet"
ROUTES = {"atlas": {"method": "GET", "path": "/api/v1/agent/pay-api/atlas", "price": "0.25"}}


def agent_snippet() -> str:
    """The first ```python block after the agent-snippet marker, exactly as written."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, "README.md lost its agent-snippet marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert match is not None, "no ```python block after the agent-snippet marker"
    return match.group(1)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Stack]:
    with Stack(ROUTES) as running:
        yield running


def test_the_readme_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```\w*\n(.*?)```", text, re.DOTALL)
    assert first_block is not None
    assert text.index(first_block.group(0)) < text.index("\n## ")
    assert first_block.group(1).splitlines() == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[demo]' && x402 demo",
        "make test",
    ]


def test_the_snippet_is_five_lines_of_code() -> None:
    code = [line for line in agent_snippet().splitlines() if line.strip()]
    assert len(code) == 5, code


async def run_snippet(gateway: Stack, wallet: Identity) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "X402_WALLET": wallet.seed_text,
        "X402_GATEWAY": gateway.url,
        "PYTHONWARNINGS": "error::UserWarning",  # a receipt warning fails the test
    }
    env.pop("X402_WALLET_FILE", None)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", agent_snippet()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_five_line_agent_pays_against_a_live_gateway(gateway: Stack) -> None:
    wallet = Identity.generate()
    await gateway.fund(wallet.public_key, "10")
    result = await run_snippet(gateway, wallet)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 "), result.stdout
    assert "'proof_header_seen': False" in result.stdout
    assert "verified=True" in result.stdout and "amount='0.25'" in result.stdout
    assert await gateway.balance(wallet.public_key) == 9_750_000


async def test_the_five_line_agent_with_an_unknown_key_says_what_to_do(gateway: Stack) -> None:
    """The commonest first failure: a key nobody registered. No traceback: the refusal
    and its next step."""
    stranger = Identity.generate()
    result = await run_snippet(gateway, stranger)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("402 "), result.stdout
    assert "unknown_payer" in result.stdout and "Next: " in result.stdout
    assert f"x402 payer register {stranger.public_key}" in result.stdout
    assert "x402 topup" in result.stdout
