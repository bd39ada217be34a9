"""Durable top-ups through the real route (anvil + USDC + the official facilitator and
client, Valkey 8 or redis-server as the ledger): kill -9 of the ledger right after a 200,
a credit not confirmed on disk, a server that cannot make a credit durable, and
`x402 reconcile` repairing a credit the ledger lost."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.core.errors import UnknownPayer
from sidecar.core.identity import Identity
from sidecar.ledger import keyspace
from sidecar.ledger.cluster import slot_of
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    official_client,
    operator,
    payers,
)
from sidecar.tools.stack import CLI, LOOPBACK, Process, Stack
from tests.support.cluster import slot_owners
from tests.support.valkey import Valkey

TOPUP = "/x402/topup"
ROUTES = {"cheap": {"method": "GET", "path": "/api/cheap", "price": "0.001"}}
USDC = 1_000_000
QUIET = {"reconcile_interval_seconds": 0}  # worker 0 leaves the repairs to the test


def settings(
    chain: AnvilChain, facilitator: FacilitatorProcess, **durability: Any
) -> dict[str, Any]:
    return exact_settings(chain, facilitator, durability={**QUIET, **durability})


async def signed(chain: AnvilChain, http: httpx.AsyncClient, key: str, payer: int) -> str:
    """The official client's PAYMENT-SIGNATURE for a 2 USDF top-up of `key`."""
    challenge = await http.post(TOPUP, params={"payer": key, "amount": "2"})
    assert challenge.status_code == 402, challenge.text
    decoded = json.loads(base64.b64decode(challenge.headers["payment-required"]))
    required = PaymentRequired.model_validate(decoded)
    client = official_client(chain, payers(chain)[payer], 50 * USDC)
    payload = await client.create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    return base64.b64encode(payload.model_dump_json(by_alias=True).encode()).decode()


async def topup(http: httpx.AsyncClient, key: str, header: str) -> httpx.Response:
    params = {"payer": key, "amount": "2"}
    return await http.post(TOPUP, params=params, headers={"PAYMENT-SIGNATURE": header})


async def settling(chain: AnvilChain, pending: asyncio.Future[httpx.Response]) -> None:
    """Until the top-up's settlement transaction waits in anvil's pool (automine off)."""
    for _ in range(400):
        if await asyncio.to_thread(chain.pending_transactions):
            return
        if pending.done():
            raise AssertionError(f"answered before settling: {pending.result().text}")
        await asyncio.sleep(0.05)
    raise AssertionError("no settlement transaction")


async def replica_fsyncs(stack: Stack) -> None:
    """Until a write to the stack's ledger is fsynced by its replica (synced, AOF on)."""
    server = client(stack)
    for _ in range(200):
        server.set("test:probe", 1)
        counts = server.execute_command("WAITAOF", 1, 1, 1000)  # type: ignore[no-untyped-call]
        if counts[1] == 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the replica never fsynced")


def restart_ledger(stack: Stack, kill: bool = True) -> None:
    """kill -9 the stack's ledger server, then start it again from its files."""
    old = stack.processes["redis"]
    old.kill()
    again = Process("redis", old.argv, old.log_path).start()
    stack.processes["redis"] = again
    stack._wait_redis(again, stack.ports["redis"], b"PING", b"+PONG")


def client(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60) as running:
        yield running


@pytest.fixture(scope="module")
def durable(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    with Stack(ROUTES, settings=settings(chain, facilitator), ledger_server="valkey") as stack:
        yield stack


async def test_kill_9_right_after_a_topups_200_keeps_the_credit(
    durable: Stack, chain: AnvilChain, http: httpx.AsyncClient
) -> None:
    http.base_url = httpx.URL(durable.url)
    ready = (await http.get(durable.sideport_url + "/readyz")).json()
    assert ready["money_in"] == "waitaof"
    key = Identity.generate().public_key
    for run in range(1, 4):
        answered = await topup(http, key, await signed(chain, http, key, payer=run))
        assert answered.status_code == 200, answered.text
        restart_ledger(durable)
        assert await durable.balance(key) == run * 2 * USDC


async def test_on_a_cluster_a_topups_200_survives_kill_9_of_its_payers_master(
    chain: AnvilChain, facilitator: FacilitatorProcess, http: httpx.AsyncClient
) -> None:
    """The ledger on Redis Cluster (three Valkey 8 masters with the AOF): the top-up waits
    on its payer's master (docs/redis.md), so that master killed right after the 200 and
    started again from its files still has the credit."""
    aof = ("--appendonly", "yes", "--appendfsync", "everysec")
    with Stack(
        ROUTES,
        settings=settings(chain, facilitator),
        redis_cluster=3,
        cluster_on_valkey=True,
        redis_args=aof,
    ) as stack:
        http.base_url = httpx.URL(stack.url)
        ready = (await http.get(stack.sideport_url + "/readyz")).json()
        assert ready["money_in"] == "waitaof", ready
        assert ready["money_in_detail"] == "WAITAOF after every credit (every master)"
        key = Identity.generate().public_key
        answered = await topup(http, key, await signed(chain, http, key, payer=1))
        assert answered.status_code == 200, answered.text
        owners = await slot_owners(stack.cluster_ports[0])
        home = stack.cluster_ports.index(owners[slot_of(keyspace.account(key))])
        old = stack.processes[f"redis{home}"]
        old.kill()  # right after the acknowledgement
        again = stack.processes[f"redis{home}"] = Process(old.name, old.argv, old.log_path).start()
        stack._wait_redis(again, stack.cluster_ports[home], b"CLUSTER INFO", b"cluster_state:ok")
        assert await stack.balance(key) == 2 * USDC


async def test_a_credit_not_confirmed_on_disk_is_a_503_naming_the_transaction(
    chain: AnvilChain, facilitator: FacilitatorProcess, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """WAITAOF for one replica, which dies while the settlement waits unmined: the money
    moved and the credit is in Redis, but the agent is told to send the same authorization
    again, never a 200; once a replica is back, the same authorization gets its 200."""
    wanting = settings(chain, facilitator, replicas=1, timeout_ms=1500)
    with Stack(ROUTES, settings=wanting, ledger_server="valkey") as stack:
        upstream = ("--replicaof", LOOPBACK, str(stack.ports["redis"]), "--appendfsync", "always")
        replica = Valkey(tmp_path / "replica", *upstream).start()
        http.base_url = httpx.URL(stack.url)
        key = Identity.generate().public_key
        header = await signed(chain, http, key, payer=4)
        before = chain.balance_of(operator(chain).address)
        try:
            await replica_fsyncs(stack)
            await asyncio.to_thread(chain.automine, False)
            try:
                pending = asyncio.ensure_future(topup(http, key, header))
                await settling(chain, pending)
                replica.kill()  # the reservation reached it; the credit will not
                await asyncio.to_thread(chain.mine)
            finally:
                await asyncio.to_thread(chain.automine, True)
            for answered in (await pending, await topup(http, key, header)):  # and once more
                assert answered.status_code == 503, answered.text
                body = answered.json()
                assert body["error"] == "credit_not_durable"
                assert body["transaction"].startswith("0x")
                assert "payment-response" not in answered.headers
            assert chain.balance_of(operator(chain).address) == before + 2 * USDC
            assert await stack.balance(key) == 2 * USDC  # credited once
            replica.start()
            await replica_fsyncs(stack)
            again = await topup(http, key, header)
            assert again.status_code == 200, again.text  # the credit's answer, at last
            assert again.json()["transaction"] == body["transaction"]
            assert again.json()["balance"] == "2"
            assert await stack.balance(key) == 2 * USDC
        finally:
            replica.kill()


async def test_a_server_without_waitaof_refuses_topups_until_it_fsyncs_always(
    chain: AnvilChain, facilitator: FacilitatorProcess, http: httpx.AsyncClient
) -> None:
    with Stack(ROUTES, settings=settings(chain, facilitator), ledger_server="redis") as stack:
        http.base_url = httpx.URL(stack.url)
        ready = (await http.get(stack.sideport_url + "/readyz")).json()
        assert ready["money_in"] == "refused" and "WAITAOF" in ready["money_in_detail"]
        log = stack.processes["sidecar"].log()
        assert '"topup.refused"' in log and "appendfsync" in log
        key = Identity.generate().public_key
        refused = await http.post(TOPUP, params={"payer": key, "amount": "2"})
        assert (refused.status_code, refused.json()["error"]) == (503, "ledger_not_durable")
        server = client(stack)
        server.config_set("appendonly", "yes")
        server.config_set("appendfsync", "always")
        for _ in range(100):  # the AOF rewrite that turning it on starts
            if server.info("persistence")["aof_rewrite_in_progress"] == 0:
                break
            await asyncio.sleep(0.05)
        answered = await topup(http, key, await signed(chain, http, key, payer=5))
        assert answered.status_code == 200, answered.text
        assert await stack.balance(key) == 2 * USDC


def reconcile(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*CLI, "reconcile", "--config", str(stack.config_path), "--json", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


async def test_reconcile_credits_a_lost_topup_exactly_once(
    chain: AnvilChain, facilitator: FacilitatorProcess, http: httpx.AsyncClient
) -> None:
    """Durability off, the ledger on RDB snapshots: a snapshot taken while the top-up's
    settlement waits unmined (its reservation made, its credit not), then kill -9 after
    the 200 loses the credit. `x402 reconcile` credits it once, and a transfer to pay_to
    that no authorization the gateway saw made is reported, never credited."""
    off = settings(chain, facilitator, money_in="off")
    rdb = ("--appendonly", "no", "--dbfilename", "ledger.rdb")
    with Stack(ROUTES, settings=off, ledger_server="valkey", redis_args=rdb) as stack:
        http.base_url = httpx.URL(stack.url)
        key = Identity.generate().public_key
        header = await signed(chain, http, key, payer=0)
        first = chain.w3.eth.block_number + 1
        chain.mint(operator(chain).address, 3)  # a transfer to pay_to nobody authorized
        await asyncio.to_thread(chain.automine, False)
        try:
            pending = asyncio.ensure_future(topup(http, key, header))
            await settling(chain, pending)
            client(stack).save()  # what survives the crash below
            await asyncio.to_thread(chain.mine)
        finally:
            await asyncio.to_thread(chain.automine, True)
        answered = await pending
        assert answered.status_code == 200, answered.text
        restart_ledger(stack)
        with pytest.raises(UnknownPayer):  # lost: the account its first credit made too
            await stack.balance(key)

        repaired = reconcile(stack, "--from-block", str(first))
        assert repaired.returncode == 0, repaired.stderr
        lines = [json.loads(line) for line in repaired.stdout.splitlines()]
        totals = lines[-1]
        assert (totals["credited"], totals["unmatched"]) == (1, 1), repaired.stdout
        credited = next(line for line in lines[:-1] if line["outcome"] == "credited")
        assert (credited["payer"], credited["value"]) == (key, 2 * USDC)
        assert credited["transaction"] == answered.json()["transaction"]
        assert await stack.balance(key) == 2 * USDC

        again = reconcile(stack, "--from-block", str(first))
        assert json.loads(again.stdout.splitlines()[-1])["credited"] == 0
        assert json.loads(again.stdout.splitlines()[-1])["known"] == 1
        assert await stack.balance(key) == 2 * USDC

        past = chain.w3.eth.block_number + 1000
        refused = reconcile(stack, "--from-block", str(past))
        assert refused.returncode == 1
        assert f"blocks {past}.." in refused.stderr and "head" in refused.stderr

        # Lost again (the snapshot once more); now worker 0 repairs it, at its start.
        restart_ledger(stack)
        config = yaml.safe_load(stack.config_path.read_text())
        config["durability"]["reconcile_interval_seconds"] = 3600
        stack.config_path.write_text(yaml.safe_dump(config))
        stack.processes.pop("sidecar").stop()
        stack.start_sidecar()
        for _ in range(200):
            scraped = (await http.get(stack.sideport_url + "/metrics")).text
            if "x402_reconcile_repairs_total 1.0" in scraped:
                break
            await asyncio.sleep(0.05)
        assert "x402_reconcile_repairs_total 1.0" in scraped
        assert await stack.balance(key) == 2 * USDC
        assert '"reconcile.credited"' in stack.processes["sidecar"].log()


async def test_failover_to_the_promoted_replica_keeps_every_answered_topup(
    chain: AnvilChain, facilitator: FacilitatorProcess, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Top-ups waiting for one replica (durability.replicas: 1); the primary is killed
    during the stream and the replica promoted (REPLICAOF NO ONE): every top-up answered
    200 is credited on it, and `x402 reconcile` against it finds nothing to add."""
    wanting = settings(chain, facilitator, replicas=1, timeout_ms=1500)
    with Stack(ROUTES, settings=wanting, ledger_server="valkey") as stack:
        upstream = ("--replicaof", LOOPBACK, str(stack.ports["redis"]), "--appendfsync", "always")
        replica = Valkey(tmp_path / "replica", *upstream).start()
        http.base_url = httpx.URL(stack.url)
        first = chain.w3.eth.block_number + 1
        try:
            await replica_fsyncs(stack)
            answered: dict[str, int] = {}
            for round_ in range(4):
                if round_ == 2:
                    stack.processes["redis"].kill()  # the primary dies mid-stream
                key = Identity.generate().public_key
                try:
                    header = await signed(chain, http, key, payer=round_ % 4)
                    answered[key] = (await topup(http, key, header)).status_code
                except AssertionError:  # no 402 to sign: the ledger is down, nothing paid
                    answered[key] = 503
            assert list(answered.values()) == [200, 200, 503, 503]
            promoted = redis.Redis(host=LOOPBACK, port=replica.port, decode_responses=True)
            promoted.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
            for key, status in answered.items():
                if status == 200:
                    account = promoted.hgetall(f"x402:{{{key}}}:account")
                    assert account["balance:USDF"] == str(2 * USDC), key
            argv = ["--redis", replica.url, "--from-block", str(first)]
            found = reconcile(stack, *argv)
            assert found.returncode == 0, found.stderr
            totals = json.loads(found.stdout.splitlines()[-1])
            assert (totals["credited"], totals["known"]) == (0, 2), found.stdout
        finally:
            replica.kill()
