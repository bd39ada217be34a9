"""Durable money-in on a real Redis Cluster (docs/redis.md, "Durability of money paid in"):
every master is asked; on Valkey 8 masters each credit waits (WAITAOF) on a connection to
the master that owns its payer's slot, and a credit to a slot that moved meanwhile fails
closed, then lands once on the new owner; on redis-server 7.0 masters it takes
`appendfsync always` on every one of them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from sidecar.core.errors import LedgerUnavailable
from sidecar.core.identity import Identity
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.cluster import slot_of
from sidecar.ledger.durability import FSYNC_ALWAYS, REFUSED, WAITAOF, DurableWrites
from sidecar.tools.stack import LOOPBACK, Process, Stack, find_binary, free_cluster_port
from tests.support.cluster import finish_migration, migrate, node, slot_owners
from tests.support.routes import ROUTES

MASTERS = 3
AOF = ("--appendonly", "yes", "--appendfsync", "everysec")


@contextmanager
def cluster_stack(redis_args: tuple[str, ...], on_valkey: bool) -> Iterator[Stack]:
    """Only the ledger: MASTERS masters joined by `redis-cli --cluster create`."""
    stack = Stack(ROUTES, redis_cluster=MASTERS, cluster_on_valkey=on_valkey, redis_args=redis_args)
    try:
        stack.start_redis()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def valkey_cluster() -> Iterator[Stack]:
    with cluster_stack(AOF, on_valkey=True) as stack:
        yield stack


@pytest.fixture
async def ledger(valkey_cluster: Stack) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(valkey_cluster.redis_url)
    yield ledger
    await ledger.close()


def source() -> str:
    """A fresh top-up authorization (`<key>:<authorizer>`): each credits once."""
    return f"eip155:31337:0xtoken:0x{secrets.token_hex(32)}:0x{secrets.token_hex(20)}"


async def credit(ledger: Ledger, durable: DurableWrites, payer: str, amount: int) -> bool:
    """One top-up's credit, as the top-up route runs it: whether it was called durable."""
    done = await Authorizations(ledger, durable).credit_topup(
        payer, "USDF", amount, source(), "0x" + "ab" * 32
    )
    assert done.applied
    return done.durable


async def waitaofs(port: int) -> int:
    async with node(port) as master:
        stats = await master.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


async def payers_on_every_master(stack: Stack) -> dict[int, str]:
    """A payer whose account lives on each master: master's port → payer."""
    owners = await slot_owners(stack.cluster_ports[0])
    found: dict[int, str] = {}
    while len(found) < MASTERS:
        payer = Identity.generate().public_key
        found.setdefault(owners[slot_of(keyspace.account(payer))], payer)
    return found


async def test_each_credit_waits_on_the_master_that_owns_its_payer(
    valkey_cluster: Stack, ledger: Ledger
) -> None:
    durable = DurableWrites(ledger)
    mode = await durable.refresh()
    assert (mode.kind, mode.detail) == (WAITAOF, "WAITAOF after every credit (every master)")
    payers = await payers_on_every_master(valkey_cluster)
    for port, payer in payers.items():
        others = {p: await waitaofs(p) for p in valkey_cluster.cluster_ports if p != port}
        before = await waitaofs(port)
        assert await credit(ledger, durable, payer, 1_000)
        assert await credit(ledger, durable, payer, 500)
        # Two waits on the payer's master, none anywhere else: each wait followed its write
        # on that master's connection (a wait elsewhere would prove nothing).
        assert await waitaofs(port) == before + 2
        assert {p: await waitaofs(p) for p in others} == others
        assert (await ledger.account(payer)).balances == {"USDF": 1_500}


async def test_one_master_without_the_aof_refuses_money_in_and_names_it(
    valkey_cluster: Stack, ledger: Ledger
) -> None:
    port = valkey_cluster.cluster_ports[1]
    async with node(port) as master:
        await master.config_set("appendonly", "no")
        try:
            mode = await DurableWrites(ledger).refresh()
        finally:
            await master.config_set("appendonly", "yes")
    assert mode.kind == REFUSED
    assert (
        mode.detail
        == f"{LOOPBACK}:{port}: the ledger's Redis has appendonly no: WAITAOF cannot fsync"
    )
    assert (await DurableWrites(ledger).refresh()).kind == WAITAOF  # asked again: fixed


async def test_a_credit_to_a_slot_that_moved_fails_closed_then_lands_once(
    valkey_cluster: Stack, ledger: Ledger
) -> None:
    """The credit's connection goes to the master the map names; the slot has moved since:
    Redis refuses before the script runs (MOVED), the top-up answers 503 with nothing
    credited, the map is reloaded, and the same top-up sent again is credited once."""
    durable = DurableWrites(ledger)
    assert (await durable.refresh()).kind == WAITAOF
    payer = Identity.generate().public_key
    assert await credit(ledger, durable, payer, 100)  # the map now names the payer's master
    ports = valkey_cluster.cluster_ports
    slot = slot_of(keyspace.account(payer))
    home = (await slot_owners(ports[0]))[slot]
    target = next(port for port in ports if port != home)
    await migrate(home, target, slot, ports)
    await finish_migration(target, slot, ports)
    authorizations = Authorizations(ledger, durable)
    again = source()
    with pytest.raises(LedgerUnavailable):
        await authorizations.credit_topup(payer, "USDF", 7, again, "0x" + "cd" * 32)
    assert (await ledger.account(payer)).balances == {"USDF": 100}
    done = await authorizations.credit_topup(payer, "USDF", 7, again, "0x" + "cd" * 32)
    assert (done.applied, done.durable) == (True, True)
    repeated = await authorizations.credit_topup(payer, "USDF", 7, again, "0x" + "cd" * 32)
    assert not repeated.applied  # the same authorization credits once
    assert (await ledger.account(payer)).balances == {"USDF": 107}


@pytest.mark.parametrize(("fsync", "kind"), [("always", FSYNC_ALWAYS), ("everysec", REFUSED)])
async def test_redis_7_0_masters_need_appendfsync_always_every_one(fsync: str, kind: str) -> None:
    """redis-server 7.0 has no WAITAOF: durable only if every master fsyncs every write."""
    always = ("--appendonly", "yes", "--appendfsync", "always")
    with cluster_stack(always, on_valkey=False) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        try:
            port = stack.cluster_ports[2]
            async with node(port) as master:
                await master.config_set("appendfsync", fsync)
            durable = DurableWrites(ledger)
            mode = await durable.refresh()
            assert mode.kind == kind, mode
            if kind == REFUSED:
                no_waitaof = f"{LOOPBACK}:{port}: the ledger's Redis has no WAITAOF"
                assert mode.detail.startswith(no_waitaof), mode
                return
            for payer in (await payers_on_every_master(stack)).values():
                assert await credit(ledger, durable, payer, 300)
                assert (await ledger.account(payer)).balances == {"USDF": 300}
        finally:
            await ledger.close()


async def test_a_cluster_that_reports_no_master_refuses_money_in(tmp_path: Path) -> None:
    """A node with cluster mode on but no slots yet (before `--cluster create`): CLUSTER
    SLOTS names no master, so nothing can be asked and money-in is refused, not assumed."""
    port = free_cluster_port()
    argv = [find_binary("redis-server"), "--port", str(port), "--bind", LOOPBACK]
    argv += ["--dir", str(tmp_path), "--cluster-enabled", "yes", "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "always"]
    process = Process("lonely", argv, tmp_path / "redis.log").start()
    ledger = Ledger.from_url(f"redis+cluster://{LOOPBACK}:{port}")
    try:
        for _ in range(200):
            async with node(port) as lonely:
                with contextlib.suppress(OSError, RedisError):
                    if await lonely.ping():
                        break
            await asyncio.sleep(0.025)
        mode = await DurableWrites(ledger).refresh()
        assert (mode.kind, mode.detail) == (REFUSED, "the ledger's Redis Cluster reports no master")
    finally:
        await ledger.close()
        process.kill()
