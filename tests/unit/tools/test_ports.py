"""Ports for the processes tests start (sidecar/tools/ports.py): the kernel's choice, or a
range of the run's own (X402_PORT_RANGE) when test runs share the machine."""

from __future__ import annotations

import socket

import pytest

from sidecar.tools import ports


@pytest.fixture
def in_range(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """A fresh allocator over 12000-22999 (the process's other state left as it was)."""
    monkeypatch.setenv(ports.RANGE_ENV, "12000-22999")
    monkeypatch.setattr(ports, "_NEXT", None)
    return 12000, 22999


def test_ports_come_from_the_range_free_and_never_twice(in_range: tuple[int, int]) -> None:
    low, high = in_range
    taken: set[int] = set()
    firsts = [ports.free_ports(3, taken) for _ in range(50)]
    spans = [set(range(first, first + 3)) for first in firsts]
    assert all(low <= min(span) and max(span) <= high for span in spans)
    assert len(set().union(*spans)) == 150  # no port handed out twice
    with socket.socket() as bound:  # one bound meanwhile is skipped
        bound.bind((ports.LOOPBACK, firsts[-1] + 3))
        assert ports.free_port() > firsts[-1] + 3


def test_a_cluster_port_and_its_bus_are_both_in_the_range(in_range: tuple[int, int]) -> None:
    low, high = in_range
    port = ports.free_cluster_port()
    assert low <= port and port + 10000 <= high
    assert ports.free_cluster_port() != port


def test_a_range_too_narrow_for_a_cluster_bus_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ports.RANGE_ENV, "12000-13000")
    with pytest.raises(ValueError, match="no port pair 10000 apart"):
        ports.free_cluster_port()


@pytest.mark.parametrize("value", ["12000", "a-b", "13000-12000", "80-2000", "60000-70000"])
def test_a_malformed_range_is_an_error(value: str) -> None:
    with pytest.raises(ValueError, match=ports.RANGE_ENV):
        ports.port_range(value)


def test_shards_split_the_ports_below_the_kernels_without_overlap() -> None:
    shares = [ports.port_range(ports.shard_range(i, 2)) for i in range(2)]
    assert shares[0] is not None and shares[1] is not None
    (low0, high0), (low1, high1) = shares[0], shares[1]
    ephemeral = int(ports.EPHEMERAL.read_text().split()[0])
    assert ports.SHARED_LOW == low0 < high0 < low1 < high1 < ephemeral
    assert high0 - low0 >= 10000 and high1 - low1 >= 10000  # room for a cluster bus
