"""`x402 load`'s pure pieces: shares, merged summaries, pre-signing, and its raw HTTP/1.1
connection against a loopback server that answers canned bytes (the stack: tests/test_load.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from sidecar.tools.load import (
    DIRECT_CEILING_PER_AGENT,
    LoadConfig,
    Stats,
    generator_cpu,
    presign_count,
    split,
)
from sidecar.tools.load.worker import HttpConnection


def test_concurrency_is_split_into_near_equal_shares() -> None:
    assert split(5, 2) == [3, 2]
    assert split(32, 1) == [32]
    assert split(4, 4) == [1, 1, 1, 1]
    assert sum(split(33, 3)) == 33


def test_processes_never_outnumber_the_loops() -> None:
    config = LoadConfig("http://x", "redis://x", ("/p",), concurrency=2, processes=8)
    assert config.process_count() == 2
    assert LoadConfig("http://x", "redis://x", ("/p",), processes=1).process_count() == 1
    assert LoadConfig("http://x", "redis://x", ("/p",), concurrency=64).process_count() >= 1


def test_merged_stats_add_up_and_take_percentiles_over_every_sample() -> None:
    one = Stats(attempted=3, cleared=2, loop_ms=[1.0, 2.0], processes=1, cpu_seconds=0.5)
    one.errors["paid: 402 insufficient_funds"] += 1
    one.statuses.update({402: 4, 200: 2})
    one.charged["USDF"] += 2000
    two = Stats(attempted=2, cleared=2, loop_ms=[3.0, 4.0], processes=1, cpu_seconds=0.25)
    two.statuses.update({402: 2, 200: 2})
    two.charged["USDF"] += 2000

    merged = Stats()
    merged.merge(one)
    merged.merge(two)
    merged.elapsed = 2.0
    summary = merged.summary()

    assert summary["attempted"] == 5 == summary["cleared"] + sum(summary["errors"].values())
    assert summary["statuses"] == {"200": 4, "402": 6}
    assert summary["charged_atomic"] == {"USDF": 4000}
    assert summary["loop_ms"]["p50"] == 3.0 and summary["loop_ms"]["max"] == 4.0
    assert summary["loops_per_second"] == 2.0
    assert summary["processes"] == 2
    assert summary["generator_cpu"] == {
        "cpu_seconds": 0.75,
        "cores": 0.375,
        "us_per_loop": 187500.0,
    }
    assert isinstance(merged.errors, Counter)


def test_generator_cpu_without_loops_or_time() -> None:
    assert generator_cpu(0.0, 0.0, 0) == {"cpu_seconds": 0.0, "cores": None, "us_per_loop": None}


def test_direct_proofs_are_presigned_for_the_run() -> None:
    # A rate bounds them; otherwise one agent's connection cannot need more than its ceiling.
    paced = LoadConfig("http://x", "redis://x", ("/p",), duration=2, concurrency=4, rate=100)
    assert presign_count(paced) == 50 + 2
    alone = LoadConfig("http://x", "redis://x", ("/p",), duration=2, concurrency=1)
    assert presign_count(alone) == DIRECT_CEILING_PER_AGENT * 2 + 2


Seen = tuple[int, bytes, bool, bool]  # status, body, receipt, keep-alive


async def _exchange_with(answers: list[bytes], requests: int) -> tuple[list[Seen], bytes]:
    """Serve `answers` in turn over loopback; send `requests` requests over one connection."""
    received = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            received.extend(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: HttpConnection(loop, 5.0), "127.0.0.1", port
    )
    seen = []
    for _ in range(requests):
        await connection.exchange(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b"".join(connection.body)
        seen.append((connection.status, body, connection.receipt, connection.keep_alive))
    connection.close()
    server.close()
    await server.wait_closed()
    return seen, bytes(received)


def test_responses_are_parsed_in_turn_on_one_connection() -> None:
    invoice = b'{"x402": {"amount": "0.001"}}'
    chunked = (
        b"HTTP/1.1 402 Payment Required\r\ntransfer-encoding: chunked\r\n\r\n"
        + f"{len(invoice):x}\r\n".encode()
        + invoice
        + b"\r\n0\r\n\r\n"
    )
    paid = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nX-Payment-Response: e30=\r\n\r\nok\n"
    closing = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

    seen, received = asyncio.run(_exchange_with([chunked, paid, closing], 3))

    assert seen == [
        (402, invoice, False, True),
        (200, b"ok\n", True, True),
        (503, b"", False, False),
    ]
    assert received.count(b"GET /p HTTP/1.1") == 3


def test_a_connection_closed_mid_answer_is_a_transport_error() -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: HttpConnection(loop, 5.0), "127.0.0.1", port
        )
        with pytest.raises(ConnectionError):
            await connection.exchange(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not connection.usable
        server.close()
        await server.wait_closed()

    asyncio.run(main())
