"""Abuse: floods of unpaid requests cost the ledger nothing (invoices are stateless); with
the dashboard on, nothing but its stream of recent decisions, capped in lines and bytes;
and however long an outsider's request, its decision line (log and stream) stays short."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import cast

import httpx
import redis.asyncio as aioredis

from sidecar.core.decision import FIELD_BYTES
from sidecar.tools.stack import LOOPBACK, Stack
from tests.support import stacks
from tests.support.payers import funded_payer_at, paid_requests

FLOOD = 10_000
CONNECTIONS = 8


LONG_PATH_BYTES = 55 * 1024  # under Envoy's 60 KB header limit, as an attacker would
# The dashboard's stream capped at LONG_STREAM_CAP and flooded past it: its cap is what
# holds. Unclipped, the lines it keeps would be 2,000 x 55 KB, eleven times the bound.
LONG_STREAM_CAP, LONG_FLOOD = 2_000, 3_200  # 16 connections x 200
LEDGER_MAXMEMORY = 64 * 1024 * 1024


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


async def test_a_flood_of_long_paths_stays_bounded_in_bytes() -> None:
    """3,200 unpaid requests with 55 KB paths, the dashboard's stream on, the ledger's
    Redis under maxmemory with noeviction (a full ledger refuses every paid request): its
    memory grows by less than 10 MB, a paid request still pays, and every line of the
    sidecar's log and Envoy's access log is short, the sidecar's clipped path marked."""
    flooded = stacks.admin_stack()
    flooded.settings = {
        **flooded.settings,
        "unlisted": "deny",  # a short 404 to read back
        "decision_stream_max": LONG_STREAM_CAP,
    }
    maxmemory = ("--maxmemory", str(LEDGER_MAXMEMORY), "--maxmemory-policy", "noeviction")
    flooded.redis_args = maxmemory
    path = "/flood/" + "x" * (LONG_PATH_BYTES - len("/flood/"))
    with flooded:
        redis = aioredis.Redis.from_url(flooded.redis_url)
        try:
            before = (await redis.info("memory"))["used_memory"]
            statuses: Counter[int] = Counter()
            per = LONG_FLOOD // 16
            port = flooded.ports["envoy"]
            await asyncio.gather(*(hammer(port, path, per, statuses) for _ in range(16)))
            assert statuses == Counter({404: LONG_FLOOD})
            lines = flooded.wait_decisions(lambda d: d.get("reason") == "unknown_route", LONG_FLOOD)
            await asyncio.sleep(0.2)  # the last batches reach the stream
            grown = (await redis.info("memory"))["used_memory"] - before
            assert grown < 10 * 1024 * 1024, grown
            # MAXLEN ~ trims whole nodes (100 entries by default): about the cap.
            assert LONG_STREAM_CAP <= await redis.xlen("x402:decisions") <= LONG_STREAM_CAP + 100
        finally:
            await redis.aclose()
        # Every line of the log is short; each flooded line keeps a clipped, marked path.
        assert len(lines) == LONG_FLOOD
        log = (flooded.dir / "sidecar.log").read_bytes().splitlines()
        assert max(len(line) for line in log) < 2048
        # Envoy's access log clips the client's method and path the same way.
        access = [
            line
            for line in (flooded.dir / "envoy.log").read_bytes().splitlines()
            if b"/flood/" in line
        ]
        assert access and max(len(line) for line in access) < 2048  # (Envoy flushes in its time)
        for line in lines[:: LONG_FLOOD // 100]:
            assert line["path"].endswith("…") and line["truncated"] == ["path"]
            assert len(line["path"].encode()) <= FIELD_BYTES
            assert path.startswith(line["path"][:-1])
        streamed = json.loads((await _newest(flooded))["line"])
        assert streamed["truncated"] == ["path"] and len(streamed["path"].encode()) <= 256
        # Paid requests keep paying.
        wallet = await funded_payer_at(flooded.redis_url, 1_000_000)
        async with httpx.AsyncClient(base_url=flooded.url, timeout=10) as client:
            receipts = await paid_requests(client, flooded, wallet, 5)
            # The ledger's memory against its maxmemory, for an alert before it is full.
            metrics = (await client.get(f"{flooded.sideport_url}/metrics")).text
        assert len(receipts) == 5
        used = _gauge(metrics, "x402_ledger_memory_used_bytes")
        assert _gauge(metrics, "x402_ledger_memory_max_bytes") == LEDGER_MAXMEMORY
        assert 0 < used < LEDGER_MAXMEMORY


async def _newest(stack: Stack) -> dict[str, str]:
    redis = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        newest = await redis.xrevrange("x402:decisions", count=1)
        return cast(list[tuple[str, dict[str, str]]], newest)[0][1]
    finally:
        await redis.aclose()


def _gauge(text: str, name: str) -> float:
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, name
    return values[0]
