"""Abuse: floods of unpaid requests cost the ledger nothing (invoices are stateless); with
the dashboard on, nothing but its capped stream of recent decisions."""

from __future__ import annotations

import asyncio
from collections import Counter

import redis.asyncio as aioredis

from sidecar.tools.stack import LOOPBACK, Stack
from tests.support import stacks

FLOOD = 10_000
CONNECTIONS = 8


async def hammer(port: int, path: str, count: int, statuses: Counter[int]) -> None:
    """Keep-alive HTTP/1.1 GETs on one connection, as fast as the stack answers."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    request = f"GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            statuses[int(lines[0].split(" ")[1])] += 1
            length = next(
                int(line.split(":")[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()


async def flood(stack: Stack, count: int) -> None:
    statuses: Counter[int] = Counter()
    await asyncio.gather(
        *(
            hammer(
                stack.ports["envoy"], "/api/v1/agent/pay-api/atlas", count // CONNECTIONS, statuses
            )
            for _ in range(CONNECTIONS)
        )
    )
    assert statuses == Counter({402: count})


async def test_unpaid_flood_does_not_grow_redis(stack: Stack) -> None:
    redis = aioredis.Redis.from_url(stack.redis_url)
    try:
        keys_before = {key async for key in redis.scan_iter(count=1000)}
        memory_before = (await redis.info("memory"))["used_memory"]
        await flood(stack, FLOOD)
        # Not one new key (earlier tests' spent nonces may expire meanwhile: a subset).
        assert {key async for key in redis.scan_iter(count=1000)} <= keys_before
        # No per-invoice state anywhere: memory moves by allocator noise only.
        assert (await redis.info("memory"))["used_memory"] - memory_before < 64 * 1024
    finally:
        await redis.aclose()


async def test_with_the_dashboard_a_flood_grows_only_its_capped_stream() -> None:
    cap = 500
    dashboard = stacks.admin_stack()
    dashboard.settings = {**dashboard.settings, "decision_stream_max": cap}
    with dashboard:
        redis = aioredis.Redis.from_url(dashboard.redis_url)
        try:
            keys_before = {key async for key in redis.scan_iter(count=1000)}
            await flood(dashboard, 4000)
            await asyncio.sleep(0.2)  # the last batches reach the stream
            keys_after = {key async for key in redis.scan_iter(count=1000)}
            assert keys_after - keys_before <= {b"x402:decisions"}
            # MAXLEN ~ trims whole nodes (100 entries by default): about the cap.
            assert cap <= await redis.xlen("x402:decisions") <= cap + 100
        finally:
            await redis.aclose()
