"""The dashboard login's backoff per client address, on a clock the test turns: a few
wrong tokens free, then waits that double, a right token clearing them, bounded memory."""

from __future__ import annotations

from sidecar.server.dashboard import auth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wrong_tokens_past_the_free_ones_make_the_address_wait_longer_each_time() -> None:
    clock = Clock()
    backoff = auth.LoginBackoff(clock)
    for _ in range(auth.FREE_FAILURES):
        assert backoff.wait("203.0.113.7") == 0
        backoff.failed("203.0.113.7")
    assert backoff.wait("203.0.113.7") == 0  # the free ones cost nothing
    waits = []
    for _ in range(4):
        backoff.failed("203.0.113.7")
        waits.append(backoff.wait("203.0.113.7"))
        clock.now += waits[-1]  # it waited as told
        assert backoff.wait("203.0.113.7") == 0
    assert waits == [2, 4, 8, 16]
    assert backoff.wait("203.0.113.8") == 0  # per address
    backoff.failed("203.0.113.7")
    assert backoff.wait("203.0.113.7") == 32
    backoff.succeeded("203.0.113.7")
    assert backoff.wait("203.0.113.7") == 0


def test_the_wait_is_capped_and_forgotten_after_a_quiet_hour() -> None:
    clock = Clock()
    backoff = auth.LoginBackoff(clock)
    for _ in range(40):
        backoff.failed("203.0.113.7")
    assert backoff.wait("203.0.113.7") == auth.MAX_WAIT_SECONDS
    clock.now += auth.MAX_WAIT_SECONDS + auth.FORGET_SECONDS + 1
    backoff.failed("203.0.113.7")
    assert backoff.wait("203.0.113.7") == 0  # a fresh start: one failure of the free ones


def test_the_table_of_addresses_is_bounded() -> None:
    backoff = auth.LoginBackoff(Clock(), max_addresses=100)
    for n in range(10_000):
        backoff.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(backoff) == 100


def test_an_ipv6_client_is_keyed_by_its_64() -> None:
    assert auth.client_key("2001:db8:1:2:aaaa::1") == auth.client_key("2001:db8:1:2:bbbb::9")
    assert auth.client_key("2001:db8:1:3::1") != auth.client_key("2001:db8:1:2::1")
    assert auth.client_key("192.0.2.1") == "192.0.2.1"
