"""Free loopback ports for the processes a test or a demo starts (tools/stack.py and the
rest): a port is only bound once its process starts, and the kernel may hand a released
port out again meanwhile, to another stack, a chain or a facilitator started beside it.

Test processes side by side (`make test`'s xdist workers, tests/conftest.py) each take
ports from a range of their own, X402_PORT_RANGE ("12000-21999"), below the kernel's
ephemeral ports, so neither can be handed a port the other chose and has not bound yet;
without it the kernel picks."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
RANGE_ENV = "X402_PORT_RANGE"


def free_port(taken: set[int] | None = None) -> int:
    return free_ports(1, taken)


# Every port this process handed out lately (see above). Cleared when full: ports that old
# are bound, or done with.
_GIVEN: set[int] = set()
_GIVEN_MAX = 8192


def port_range(value: str | None = None) -> tuple[int, int] | None:
    """X402_PORT_RANGE as (lowest, highest), None when unset; a malformed one is an error
    (a run that silently shared the kernel's ports would flake, not fail)."""
    value = os.environ.get(RANGE_ENV) if value is None else value
    if not value:
        return None
    low, _, high = value.partition("-")
    try:
        bounds = int(low), int(high)
    except ValueError:
        raise ValueError(f"{RANGE_ENV}={value!r}: expected LOW-HIGH, e.g. 12000-21999") from None
    if not 1024 <= bounds[0] < bounds[1] <= 65535:
        raise ValueError(f"{RANGE_ENV}={value!r}: expected 1024 <= LOW < HIGH <= 65535")
    return bounds


# Below the kernel's ephemeral ports and above every port the chart's pods bind on a host's
# network (Envoy's 10000 and below).
SHARED_LOW = 11000
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def shard_range(index: int, count: int) -> str:
    """X402_PORT_RANGE for the `index`th of `count` test runs side by side: an equal share
    of the ports between SHARED_LOW and the kernel's ephemeral ones."""
    try:
        ephemeral = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default
    width = (ephemeral - SHARED_LOW) // count
    low = SHARED_LOW + index * width
    return f"{low}-{low + width - 1}"


def _candidates(bounds: tuple[int, int] | None) -> Iterator[int]:
    """Where a span may start: the kernel's choice, or the range's ports in turn."""
    if bounds is None:
        while True:
            with socket.socket() as s:
                s.bind((LOOPBACK, 0))
                port = int(s.getsockname()[1])
            yield port  # released: the kernel picks the next one afresh
    yield from itertools.cycle(range(bounds[0], bounds[1] + 1))


_NEXT: Iterator[int] | None = None


def free_ports(count: int, taken: set[int] | None = None) -> int:
    """The first of `count` consecutive free ports (one per sidecar worker), none of them
    in `taken` nor handed out lately by this process; they join both."""
    global _NEXT
    taken = set() if taken is None else taken
    bounds = port_range()
    if _NEXT is None:
        _NEXT = _candidates(bounds)
    highest = 65535 if bounds is None else bounds[1]
    for first in _NEXT:
        span = set(range(first, first + count))
        if first + count - 1 <= highest and not span & taken and _bindable(span):
            taken |= span
            return first
    raise AssertionError("unreachable: the candidates never end")


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000, fixed in Redis 6) is free as well, both
    within X402_PORT_RANGE when one is set (then at least 10,001 ports wide)."""
    bounds = port_range()
    if bounds is None:
        while True:
            port = free_port()
            if port + 10000 < 65536 and _bindable({port + 10000}):
                return port
    low, high = bounds
    for port in range(low, high - 10000 + 1):
        if _bindable({port, port + 10000}):
            return port
    raise ValueError(f"{RANGE_ENV}: no port pair 10000 apart is free in {low}-{high}")


def _bindable(ports: set[int]) -> bool:
    """Whether none of `ports` was handed out lately and all can be bound now; if so they
    are handed out."""
    if ports & _GIVEN:
        return False
    with contextlib.ExitStack() as held:
        try:
            for port in ports:
                held.enter_context(socket.socket()).bind((LOOPBACK, port))
        except OSError:
            return False
    if len(_GIVEN) >= _GIVEN_MAX:
        _GIVEN.clear()
    _GIVEN.update(ports)
    return True
