"""`x402 demo --serve` as a user starts it: a subprocess, read until it is up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

X402 = str(Path(sys.executable).with_name("x402"))
READY = "Ctrl-C stops everything"


def serve_demo(*args: str) -> subprocess.Popen[str]:
    """`x402 demo --serve ARGS`, its stdout and stderr on one unbuffered pipe."""
    return subprocess.Popen(
        [X402, "demo", "--serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )


def read_until_up(process: subprocess.Popen[str], timeout: float = 60) -> str:
    """What the demo printed until it said it is up; fails with that text otherwise."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(READY in line for line in lines):
        line = process.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines)
        lines.append(line)
    return "".join(lines)
