"""Free loopback ports for the processes a test or a demo starts (tools/stack.py and the
rest): a port is only bound once its process starts, and the kernel may hand a released
port out again meanwhile, to another stack, a chain or a facilitator started beside it."""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def free_port(taken: set[int] | None = None) -> int:
    return free_ports(1, taken)


# Every port this process handed out lately (see above). Cleared when full: ports that old
# are bound, or done with.
_GIVEN: set[int] = set()
_GIVEN_MAX = 8192


def free_ports(count: int, taken: set[int] | None = None) -> int:
    """The first of `count` consecutive free ports (one per sidecar worker), none of them
    in `taken` nor handed out lately by this process; they join both."""
    taken = set() if taken is None else taken
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            first = int(s.getsockname()[1])
        span = set(range(first, first + count))
        if span & taken or span & _GIVEN:
            continue
        with contextlib.ExitStack() as held:
            try:
                for port in span:
                    held.enter_context(socket.socket()).bind((LOOPBACK, port))
            except OSError:
                continue
        taken |= span
        if len(_GIVEN) >= _GIVEN_MAX:
            _GIVEN.clear()
        _GIVEN.update(span)
        return first


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000, fixed in Redis 6) is free as well."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind((LOOPBACK, port + 10000))
                except OSError:
                    continue
                return port
