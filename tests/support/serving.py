"""`x402 serve` as an operator runs it, in its own process, for start-up tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sidecar.core.identity import Identity, write_secret
from sidecar.tools.stack import LOOPBACK, free_port
from tests.support.cli import ROOT


def serve_config(directory: Path, **settings: Any) -> Path:
    """A config for one worker on fresh loopback ports, with its own keys."""
    Identity.generate().save(directory / "signing.key")
    write_secret(directory / "invoice.secret", os.urandom(32).hex() + "\n")
    taken: set[int] = set()  # the kernel may hand a released port out again
    config = {
        "listen_grpc": f"{LOOPBACK}:{free_port(taken)}",
        "listen_authz_http": f"{LOOPBACK}:{free_port(taken)}",
        "listen_http": f"{LOOPBACK}:{free_port(taken)}",
        "listen_admin": "",
        "signing_key_file": str(directory / "signing.key"),
        "invoice_secret_file": str(directory / "invoice.secret"),
        "workers": 1,
        **settings,
    }
    path = directory / "x402.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def serve(config: Path, limit: float = 60) -> subprocess.CompletedProcess[str]:
    """`x402 serve` that is expected to refuse to start (it returns)."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=limit,
        cwd=ROOT,
    )


@contextmanager
def serving(config: Path) -> Iterator[subprocess.Popen[str]]:
    """`x402 serve` running (stdout and stderr to files beside the config); stopped on exit."""
    out, err = (config.with_suffix(s).open("w") for s in (".out", ".err"))
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar.tools.cli", "serve", "--config", str(config)],
        stdout=out,
        stderr=err,
        text=True,
        cwd=ROOT,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()
        err.close()


def wait_log(config: Path, event: str, limit: float = 30) -> Mapping[str, Any]:
    """The first JSON log line of `event` the sidecar of `config` wrote."""
    deadline = time.monotonic() + limit
    log = config.with_suffix(".out")
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("{") and (entry := json.loads(line)).get("event") == event:
                return dict(entry)
        time.sleep(0.1)
    raise AssertionError(f"no {event} line in {log}: {log.read_text()[-2000:]}")
