"""The metrics module's own pieces (the /metrics page end to end: tests/test_metrics.py)."""

from __future__ import annotations

import os

from sidecar.server import metrics


def test_process_id_is_the_pid_and_follows_a_fork() -> None:
    assert metrics.process_id() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, f"{metrics.process_id()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    seen, actual = os.read(read, 64).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert seen == actual == str(child)
