"""The pipelined Redis client against a real redis-server started here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.core.errors import LedgerUnavailable
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.vouchers import Voucher
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.channels import Channels
from sidecar.ledger.cluster import parse_cluster_url
from sidecar.ledger.holds import CAPTURED, Holds
from sidecar.ledger.pipe import (
    TLS,
    ConnectionFailed,
    RedisPipe,
    RedisPipeError,
    ReplyError,
    Script,
    parse_url,
    redacted,
)
from sidecar.tools.stack import LOOPBACK, find_binary, free_port
from tests.support.streams import raw_pipe

COUNTER = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


class Redis:
    """A redis-server process that can be killed and started again on the same port."""

    def __init__(self, workdir: Path, *options: str) -> None:
        self.port = free_port()
        self.socket = str(workdir / "redis.sock")
        self.workdir = workdir
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                find_binary("redis-server"),
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--unixsocket",
                self.socket,
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port)):
                return
            time.sleep(0.025)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def pipe(redis: Redis) -> AsyncIterator[RedisPipe]:
    client = RedisPipe(redis.url, timeout=2.0, scripts=(COUNTER,))
    yield client
    await client.close()


async def test_many_calls_in_flight_share_one_connection(pipe: RedisPipe) -> None:
    replies = await asyncio.gather(*(pipe.evalsha(COUNTER, ("n",), (1,)) for _ in range(2000)))

    assert replies == list(range(1, 2001))  # each caller got its own reply, in order
    clients = await pipe.call("CLIENT", "LIST")
    assert len(clients.splitlines()) == 1


async def test_an_error_reply_fails_only_its_own_call(pipe: RedisPipe) -> None:
    await pipe.call("SET", "text", "abc")
    results = await asyncio.gather(
        pipe.call("ECHO", "before"),
        pipe.call("INCR", "text"),
        pipe.call("ECHO", "after"),
        return_exceptions=True,
    )
    assert results[0] == "before" and results[2] == "after"
    assert isinstance(results[1], ReplyError)


async def test_noscript_after_script_flush_reloads_and_retries(pipe: RedisPipe) -> None:
    assert await pipe.evalsha(COUNTER, ("k",), (5,)) == 5
    assert await pipe.call("SCRIPT", "FLUSH") == "OK"

    replies = await asyncio.gather(*(pipe.evalsha(COUNTER, ("k",), (1,)) for _ in range(50)))

    assert sorted(replies) == list(range(6, 56))  # each ran exactly once


async def test_a_cancelled_call_does_not_desynchronise_later_replies(pipe: RedisPipe) -> None:
    # BLPOP holds the connection's replies back, so the calls behind it are surely waiting.
    blocked = asyncio.ensure_future(pipe.call("BLPOP", "nothing", "0.3"))
    echoes = [asyncio.ensure_future(pipe.call("ECHO", str(i))) for i in range(100)]
    await asyncio.sleep(0.05)
    blocked.cancel()
    for echo in echoes[::2]:
        echo.cancel()

    answered = await asyncio.gather(*echoes[1::2])

    assert answered == [str(i) for i in range(1, 100, 2)]
    assert await pipe.call("ECHO", "next") == "next"


async def test_a_caller_that_gave_up_can_still_learn_the_outcome(redis: Redis) -> None:
    ledger = Ledger.from_url(redis.url, timeout=5.0)
    await ledger.register("payer")
    await ledger.credit("payer", "USDF", 100, "once")
    assert await ledger.ping()  # connected, scripts loaded
    admin = RedisPipe(redis.url)
    await admin.call("CLIENT", "PAUSE", 10_000, "WRITE")  # the debit waits inside Redis
    # The check shields its ledger step (server/authz/check.py): the step runs on.
    step = asyncio.ensure_future(
        ledger.debit("payer", "n1", "USDF", 30, int(time.time()) + 60, "r1", {})
    )
    debit = asyncio.ensure_future(asyncio.shield(step))
    await asyncio.sleep(0.1)
    debit.cancel()  # Envoy gave up on the check, the script is already in Redis

    await admin.call("CLIENT", "UNPAUSE")
    pipe = raw_pipe(ledger)
    assert isinstance(pipe, RedisPipe)
    assert await pipe.call("ECHO", "after") == "after"  # replies in order

    assert debit.cancelled()
    assert await step == 70  # charged after all, and the shielded step knows
    assert (await ledger.account("payer")).balances["USDF"] == 70
    await admin.close()
    await ledger.close()


async def test_cancelled_after_the_reply_but_before_resuming_still_reports(
    pipe: RedisPipe,
) -> None:
    heard: list[object] = []
    assert await pipe.ping()  # connected
    call = asyncio.ensure_future(pipe.call("ECHO", "charged", late=heard.append))
    connection = pipe._connection
    assert connection is not None
    received = connection.data_received

    def then_cancel(data: bytes) -> None:
        received(data)  # the reply is in the caller's future, its task not yet resumed
        call.cancel()

    connection.data_received = then_cancel  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await call
    assert heard == ["charged"]


async def test_an_overdue_reply_fails_the_calls_then_the_client_reconnects(
    redis: Redis,
) -> None:
    pipe = RedisPipe(redis.url, timeout=0.2)
    stuck = pipe.call("BLPOP", "nothing", "2")  # longer than the timeout
    behind = pipe.call("ECHO", "behind")
    results = await asyncio.gather(stuck, behind, return_exceptions=True)

    assert all(isinstance(r, ConnectionFailed) for r in results)
    assert await pipe.call("ECHO", "again") == "again"
    await pipe.close()


async def test_a_restarted_redis_is_unavailable_then_recovers(redis: Redis) -> None:
    ledger = Ledger.from_url(redis.url, timeout=1.0)
    await ledger.register("payer")
    await ledger.credit("payer", "USDF", 100, "once")
    assert await ledger.debit("payer", "n1", "USDF", 10, int(time.time()) + 60, "r1", {}) == 90

    redis.kill()
    with pytest.raises(LedgerUnavailable):
        await ledger.debit("payer", "n2", "USDF", 10, int(time.time()) + 60, "r2", {})
    assert not await ledger.ping()

    redis.start()  # empty, without scripts: the client loads them again by itself
    admin = Ledger.from_url(redis.url)  # redis-py's pool would fail once on its dead socket
    await admin.register("payer")
    await admin.credit("payer", "USDF", 100, "again")
    await admin.close()
    assert await ledger.debit("payer", "n3", "USDF", 10, int(time.time()) + 60, "r3", {}) == 90
    assert await ledger.ping()
    await ledger.close()


async def test_connection_refused_is_an_error_not_a_hang() -> None:
    port = free_port()
    pipe = RedisPipe(f"redis://{LOOPBACK}:{port}/0", timeout=1.0)
    with pytest.raises(RedisPipeError):
        await pipe.call("PING")
    assert not await pipe.ping()
    assert pipe.last_error.startswith(f"cannot connect to Redis at {LOOPBACK}:{port}: ")


async def test_password_database_and_unix_socket(tmp_path: Path) -> None:
    server = Redis(tmp_path, "--requirepass", "s3cret")
    server.start()
    try:
        over_tcp = RedisPipe(f"redis://:s3cret@{LOOPBACK}:{server.port}/3")
        await over_tcp.call("SET", "where", "db3")
        over_unix = RedisPipe(f"unix://:s3cret@{server.socket}?db=3")
        assert await over_unix.call("GET", "where") == "db3"
        wrong = RedisPipe(f"redis://:wrong@{LOOPBACK}:{server.port}/0")
        with pytest.raises(ReplyError, match="refused the credentials"):
            await wrong.call("PING")
        # A database the server will never have is named as such, not as Redis down.
        missing = RedisPipe(f"redis://:s3cret@{LOOPBACK}:{server.port}/99")
        assert not await missing.ping()
        assert missing.last_error.startswith(
            f"Redis at {LOOPBACK}:{server.port} has no database 99"
        )
        for client in (over_tcp, over_unix, wrong, missing):
            await client.close()
    finally:
        server.kill()


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost",
        "redis://host/zero",
        "unix://",
        "redis://host/0?ssl_ca_certs=/ca.pem",  # TLS files need rediss://
        "rediss://host/0?ssl_keyfile=/k.pem",  # a key without its certificate
        "redis://host/0?timeout=1",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        RedisPipe(url)


def test_tls_urls_and_their_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not read until a connection is made")
    address = parse_url(f"rediss://u:p@redis.internal:6380/2?ssl_ca_certs={ca}")
    assert (address.host, address.port, address.db) == ("redis.internal", 6380, 2)
    assert address.tls == TLS(ca_file=str(ca))
    assert parse_url("rediss://redis.internal").tls == TLS()  # the system's CAs
    assert parse_url("redis://redis.internal").tls is None
    cluster = parse_cluster_url("rediss+cluster://:pw@a:7000,b:7001?ssl_certfile=/c&ssl_keyfile=/k")
    assert cluster.seeds == (("a", 7000), ("b", 7001))
    assert cluster.tls == TLS(cert_file="/c", key_file="/k")
    assert parse_cluster_url("redis+cluster://a:7000").tls is None
    with pytest.raises(ValueError, match="ssl_ca_certs=/nowhere: no such file"):
        RedisPipe("rediss://a/0?ssl_ca_certs=/nowhere")


def test_urls_in_logs_hide_the_password() -> None:
    assert (
        redacted("rediss://user:pa:ss@h:1/0?ssl_ca_certs=/ca")
        == "rediss://user:***@h:1/0?ssl_ca_certs=/ca"
    )
    assert redacted("redis+cluster://:pw@a:1,b:2") == "redis+cluster://:***@a:1,b:2"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


async def test_every_hot_path_money_script_past_its_deadline_moves_nothing(redis: Redis) -> None:
    """The deadline check every money script starts with (lua/money.lua): past it, the
    debit, hold, capture, voucher and reservation scripts answer `deadline_passed`
    (LedgerUnavailable, a 503) and move nothing; in time, the same call goes through."""
    ledger = Ledger.from_url(redis.url, timeout=5.0)
    await ledger.register("payer")
    await ledger.credit("payer", "USDF", 100, "once")
    expires, late = int(time.time()) + 60, -1.0  # `within` < 0: the caller has given up

    with pytest.raises(LedgerUnavailable, match="too late"):
        await ledger.debit("payer", "n1", "USDF", 30, expires, "r1", {}, within=late)
    assert await ledger.debit("payer", "n1", "USDF", 30, expires, "r1", {}) == 70

    holds = Holds(ledger)
    with pytest.raises(LedgerUnavailable, match="too late"):
        await holds.place("payer", "n2", "USDF", 20, expires, "h1", 60, {}, within=late)
    assert await holds.place("payer", "n2", "USDF", 20, expires, "h1", 60, {}) == 50
    with pytest.raises(LedgerUnavailable, match="too late"):
        await holds.capture("payer", "h1", 20, int(time.time()), within=late)
    assert await holds.open_holds("payer") == 1
    assert (await holds.capture("payer", "h1", 20, int(time.time()))).outcome == CAPTURED

    channels = Channels(ledger)
    channel_id, _ = await channels.open("payer", "USDF", 40, "gw")
    terms = {"channel_id": channel_id, "sequence": 1, "cumulative": "0.00001"}
    voucher = Voucher(channel_id, "USDF", "0.00001", 1, "GET /", "gw", "payer", "", b"", terms)
    price = Price("r", 10, Asset("USDF", 6))
    with pytest.raises(LedgerUnavailable, match="too late"):
        await channels.accept(voucher, 10, price, "gw", 0, within=late)
    assert (await channels.get("payer", channel_id)).sequence == 0
    assert await channels.accept(voucher, 10, price, "gw", 0) == (30, 10)

    authorizations = Authorizations(ledger)
    with pytest.raises(LedgerUnavailable, match="too late"):
        await authorizations.reserve("0xabc", "k", int(time.time()) + 60, within=late)
    reservation = await authorizations.reserve("0xabc", "k", int(time.time()) + 60)
    assert isinstance(reservation, str) and reservation.startswith("reserved:")
    account = await ledger.account("payer")
    assert (account.balances, account.debited, account.channeled) == (
        {"USDF": 10},
        {"USDF": 50},
        {"USDF": 40},
    )
    await ledger.close()
