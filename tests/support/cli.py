"""Run the real `x402` CLI (or a test-support script) in its own process."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str


async def x402(*args: str, env: dict[str, str] | None = None, limit: float = 60) -> Run:
    """Run the real CLI in its own process, as an operator would."""
    return await python_module("sidecar.tools.cli", *args, env=env, limit=limit)


async def python_module(
    module: str, *args: str, env: dict[str, str] | None = None, limit: float = 60
) -> Run:
    """`python -m MODULE ARGS…` in its own process, from the repository's root."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), limit)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())
