"""Settlement batches end to end: paid requests through real Envoy → `x402 settle` (a real
process) → signed manifests whose Merkle roots hold; crashes at every step; many workers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from sidecar.core import batches
from sidecar.core.identity import KeySet
from sidecar.core.protocol import canonical_json
from sidecar.ledger import evidence, keyspace, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.admin import start_facilities
from sidecar.server.config import Settings
from sidecar.tools.stack import Stack
from tests.support.payers import paid_requests, payers_with_receipts
from tests.support.routes import ENVOY_ROUTES, ROUTES, VERIFY_PRICE
from tests.support.settlement import (
    assert_exactly_once,
    jsonl_manifests,
    leaves_root,
    remember_gateway,
    settle,
    settle_crash,
)
from tests.support.streams import raw


@pytest.fixture(scope="module")
def sstack() -> Iterator[Stack]:
    """A stack of its own: these tests settle every payer of its Redis."""
    stack = Stack(ROUTES, envoy_routes=ENVOY_ROUTES)
    stack.settings = {"anchor_file": str(stack.dir / "anchors.jsonl"), "settle_lease_seconds": 1}
    with stack:
        remember_gateway(stack)
        yield stack


@pytest.fixture(scope="module")
async def sledger(sstack: Stack) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(sstack.redis_url)
    yield ledger
    await ledger.close()


@pytest.fixture
async def sclient(sstack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sstack.url, timeout=10) as http:
        yield http


def public_key(stack: Stack) -> str:
    return stack.gateway_identity.public_key


async def test_paid_requests_settle_into_signed_batches(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    made = await payers_with_receipts(sledger, sclient, sstack, [12, 3])

    run = await settle(sstack, "--batch-size", "5")

    assert run.code == 0, run.err
    assert "settled 15 receipts in 4 batches" in run.out  # 5+5+2 and 3
    await assert_exactly_once(sledger, public_key(sstack))
    for wallet, receipts in made:
        manifests = await settlement.payer_batches(sledger, wallet.public_key)
        assert [m["count"] for m in manifests] == ([5, 5, 2] if len(receipts) == 12 else [3])
        # The leaves are the receipts the agent got in its response headers, byte for byte.
        start = 0
        for manifest in manifests:
            chunk = receipts[start : start + manifest["count"]]
            start += manifest["count"]
            assert manifest["merkle_root"] == leaves_root([batches.leaf(r) for r in chunk])
            assert manifest["totals"] == {"USDF": str(10_000 * len(chunk))}
            assert manifest["kid"] == sstack.gateway_identity.kid
            assert manifest["closed_at"] == max(r["issued_at"] for r in chunk)
        # A forged manifest (its root changed) no longer verifies.
        forged = {**manifests[0], "merkle_root": "00" * 32}
        assert not batches.verify_manifest(forged, public_key(sstack))
    # Both anchor sinks hold the same manifests, each once.
    anchored = jsonl_manifests(sstack.dir / "anchors.jsonl")
    assert len({m["batch_id"] for m in anchored}) == len(anchored)
    for manifest in anchored:
        stored = await raw(sledger).get(keyspace.batch(manifest["batch_id"]))
        assert stored is not None and canonical_json(manifest).decode() == stored


async def test_a_partial_batch_waits_until_it_is_old_enough(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    [(wallet, _receipts)] = await payers_with_receipts(sledger, sclient, sstack, [7])

    # Not --flush: one full batch of 5 goes now, the 2 left wait for --max-age.
    run = await settle(sstack, "--batch-size", "5", "--max-age", "3600", "--no-flush")

    assert run.code == 0, run.err
    manifests = await settlement.payer_batches(sledger, wallet.public_key)
    assert [m["count"] for m in manifests] == [5]
    assert "1 waiting" in run.out
    run = await settle(sstack, "--batch-size", "5", "--max-age", "0", "--no-flush")
    assert [m["count"] for m in await settlement.payer_batches(sledger, wallet.public_key)] == [
        5,
        2,
    ]


CRASH_LEASE = 3.0  # seconds


@pytest.mark.parametrize("step", settlement.FAULT_STEPS)
async def test_a_worker_killed_at_any_step_loses_nothing_and_doubles_nothing(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient, step: str
) -> None:
    await payers_with_receipts(sledger, sclient, sstack, [4, 9])
    before = await _committed(sledger)

    # The crashed worker's lease must outlive the next worker's start-up (a second or more
    # on a loaded machine) for "busy" to be seen; the rerun then waits until it has lapsed
    # (it was taken before the crash, so it lapses before `leased_until`).
    crashed = await settle_crash(
        sstack, step, "--batch-size", "4", "--worker-id", "w-crashed", "--lease", str(CRASH_LEASE)
    )
    leased_until = time.monotonic() + CRASH_LEASE

    assert crashed.code == -signal.SIGKILL, crashed.err
    after_crash = await _committed(sledger)
    assert after_crash - before == (1 if step == "after_commit" else 0)
    if step == "mid_jsonl":  # the torn line is really there
        assert not (sstack.dir / "anchors.jsonl").read_bytes().endswith(b"\n")

    if step != "after_commit":
        # Another worker, while the crashed one's lease holds: the claim is not its to take.
        busy = await settle(sstack, "--batch-size", "4", "--worker-id", "w-other")
        assert busy.code == 0, busy.err
        assert "1 busy" in busy.out
        await asyncio.sleep(max(0.0, leased_until + 0.1 - time.monotonic()))

    rerun = await settle(sstack, "--batch-size", "4", "--worker-id", "w-rerun")

    assert rerun.code == 0, rerun.err
    await assert_exactly_once(sledger, public_key(sstack))
    anchored = jsonl_manifests(sstack.dir / "anchors.jsonl")
    assert len({m["batch_id"] for m in anchored}) == len(anchored)  # the sink is idempotent
    assert {m["batch_id"] for m in anchored} == set(await _all_batch_ids(sledger))


async def test_many_workers_at_once_put_every_receipt_in_exactly_one_batch(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    await payers_with_receipts(sledger, sclient, sstack, [40, 25, 17, 9, 30])

    runs = await asyncio.gather(
        *(settle(sstack, "--batch-size", "3", "--worker-id", f"w-{i}") for i in range(4))
    )

    assert all(run.code == 0 for run in runs), [run.err for run in runs]
    await assert_exactly_once(sledger, public_key(sstack))
    anchored = jsonl_manifests(sstack.dir / "anchors.jsonl")
    assert len({m["batch_id"] for m in anchored}) == len(anchored)


async def test_settle_reports_the_lag_it_leaves(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    await payers_with_receipts(sledger, sclient, sstack, [2])
    await settle(sstack, "--max-age", "3600", "--no-flush")

    lag = await settlement.settlement_lag(sledger)
    assert lag is not None and 0 <= lag < 60

    await settle(sstack)
    assert await settlement.settlement_lag(sledger) == 0.0


async def _committed(ledger: Ledger) -> int:
    return len(await _all_batch_ids(ledger))


async def _all_batch_ids(ledger: Ledger) -> list[Any]:
    ids = []
    async for payer in raw(ledger).sscan_iter(keyspace.PAYERS):
        ids += await raw(ledger).lrange(keyspace.payer_batches(payer), 0, -1)
    return ids


async def test_the_sidecar_can_settle_by_itself(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    """settle_interval_seconds: the loop worker 0 runs, here in process on the same Redis."""
    settings = replace(
        Settings.load(sstack.config_path),
        settle_interval_seconds=1,
        settle_max_age_seconds=0,
        listen_admin="",
    )
    facilities = await start_facilities(settings, sledger, settings.gateway())
    try:
        [(wallet, _receipts)] = await payers_with_receipts(sledger, sclient, sstack, [3])
        for _ in range(100):
            manifests = await settlement.payer_batches(sledger, wallet.public_key)
            if sum(m["count"] for m in manifests) == 3:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the in-sidecar settle loop settled nothing")
    finally:
        await facilities.close(2)
    await assert_exactly_once(sledger, public_key(sstack))


async def test_settled_receipts_past_retention_leave_the_ledger_and_unsettled_ones_stay(
    sstack: Stack, sledger: Ledger, sclient: httpx.AsyncClient
) -> None:
    [(wallet, _receipts)] = await payers_with_receipts(sledger, sclient, sstack, [4])
    payer = wallet.public_key
    settings = Settings.load(sstack.config_path, env={})
    assert settings.receipt_retention_seconds == 30 * 86400  # the default
    kept = keyspace.receipts(payer)

    async def settle_pass(later: float = 0, **options: Any) -> evidence.Export:
        keys = KeySet(sstack.gateway_identity)
        settler = settlement.Settler(
            sledger,
            keys,
            settings.asset_table(),
            wiring.anchor_sinks(settings, sledger),
            settlement.Options(**{"retention": settings.receipt_retention_seconds, **options}),
            clock=lambda: time.time() + later,
        )
        await settler.settle_payer(payer, settlement.Report())
        query, assets = evidence.Query(payer=payer), settings.asset_table()
        return await evidence.export(sledger, keys, assets, query)

    settled = await settle_pass(flush=True)  # the four settle; none is a month old
    assert (settled.expired, len(settled.bundle["receipts"])) == (0, 4)
    await sledger.credit(payer, "USDF", 2 * VERIFY_PRICE, f"more-{payer}")
    await paid_requests(sclient, sstack, wallet, 2)
    # A retention of 1 ms, the two new receipts not old enough to settle: the settled four
    # leave the ledger, the unsettled two stay.
    waiting = await settle_pass(retention=0.001, max_age=3600)
    assert await raw(sledger).xlen(kept) == 2
    assert (waiting.expired, waiting.unsettled, waiting.bundle["receipts"]) == (1, 2, [])
    settled = await settle_pass(flush=True)  # they settle, and stay (30 days)
    assert (settled.expired, len(settled.bundle["receipts"])) == (1, 2)
    assert [m["count"] for m in await settlement.payer_batches(sledger, payer)] == [4, 2]
    # A month later they are past the default retention as well.
    later = await settle_pass(later=31 * 86400)
    assert await raw(sledger).xlen(kept) == 0
    assert (later.expired, later.bundle["receipts"]) == (2, [])
    assert (await sledger.account(payer)).balances["USDF"] == 0  # money untouched by it
