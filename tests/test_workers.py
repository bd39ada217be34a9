"""Several sidecar workers behind one Envoy: payments, spreading, restarts and draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.payers import funded_payer, pay_direct
from tests.support.routes import ROUTES
from tests.support.stacks import authz_endpoints

VERIFY = "/api/v1/trade/verify/T-1"
PRICE = 10_000


@pytest.fixture(scope="module")
def workers_stack() -> Iterator[Stack]:
    with Stack(ROUTES, workers=2) as running:
        yield running


def started(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for line in stack.processes["sidecar"].log().splitlines():
        if '"sidecar.started"' in line:
            lines.append(json.loads(line))
    return lines


def active_checks_per_worker(stack: Stack) -> dict[str, int]:
    """Envoy's checks in flight to each sidecar worker (admin /clusters, per host)."""
    url = f"http://127.0.0.1:{stack.ports['admin']}/clusters"
    with urllib.request.urlopen(url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    checks, hosts = authz_endpoints(stack)
    per_worker = dict.fromkeys(hosts, 0)
    for line in lines:
        cluster, _, rest = line.partition("::")
        host, _, stat = rest.partition("::")
        if cluster == checks and stat.startswith("rq_active::"):
            per_worker[host] = int(stat.rpartition("::")[2])
    return per_worker


async def eventually(check: Any, attempts: int = 200) -> None:
    """Poll a condition that another process makes true (no timing is asserted)."""
    for _ in range(attempts):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never became true")


async def test_workers_share_the_checks_and_charge_exactly(workers_stack: Stack) -> None:
    stack = workers_stack
    ledger = Ledger.from_url(stack.redis_url)
    wallet = await funded_payer(ledger, 30 * PRICE)
    proofs = [pay_direct(stack, wallet, f"GET {VERIFY}", "0.01") for _ in range(40)]
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        responses = await asyncio.gather(*(client.get(VERIFY, headers=h) for h in proofs))

    assert Counter(r.status_code for r in responses) == {200: 30, 402: 10}
    account = await ledger.account(wallet.public_key)
    assert (account.balances["USDF"], account.debited["USDF"]) == (0, 30 * PRICE)
    await ledger.close()
    await asyncio.sleep(0.2)  # decision lines are written after the answer
    paid = [d for d in stack.decisions() if d["payer"] == wallet.public_key]
    assert len(paid) == 40
    assert {d["worker"] for d in paid} == {0, 1}  # Envoy spreads checks over both
    assert {s["worker"] for s in started(stack)} == {0, 1}


async def test_a_dead_worker_is_restarted(workers_stack: Stack) -> None:
    stack = workers_stack
    [victim] = [s["pid"] for s in started(stack) if s["worker"] == 1]
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> bool:
        return any(s["worker"] == 1 and s["pid"] != victim for s in started(stack))

    await eventually(restarted)
    async with httpx.AsyncClient(timeout=10) as side:
        ready = await side.get(f"{stack.sideport_url}/readyz")
        assert ready.status_code == 200
    ledger = Ledger.from_url(stack.redis_url)
    wallet = await funded_payer(ledger, 10 * PRICE)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        for _ in range(10):  # round robin: both workers answer
            headers = pay_direct(stack, wallet, f"GET {VERIFY}", "0.01")
            assert (await client.get(VERIFY, headers=headers)).status_code == 200
    assert (await ledger.account(wallet.public_key)).balances["USDF"] == 0
    await ledger.close()
    assert "sidecar.worker_exited" in stack.processes["sidecar"].log()


async def test_sigterm_drains_in_flight_checks() -> None:
    # Envoy and the sidecar wait longer than Redis is paused: the checks stay in flight.
    with Stack(ROUTES, workers=2, settings={"redis_timeout_ms": 8000}) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 10 * PRICE)
        await ledger.close()
        proofs = [pay_direct(stack, wallet, f"GET {VERIFY}", "0.01") for _ in range(10)]
        redis = aioredis.Redis.from_url(stack.redis_url)
        async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
            # Scripts wait inside Redis until UNPAUSE; reads (UNPAUSE itself) still run.
            await redis.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")  # type: ignore[no-untyped-call]
            requests = [asyncio.ensure_future(client.get(VERIFY, headers=h)) for h in proofs]

            async def all_checks_in_flight() -> bool:
                # Every check waiting in a worker, and each worker holding some of them.
                per_worker = await asyncio.to_thread(active_checks_per_worker, stack)
                return sum(per_worker.values()) == len(proofs) and all(per_worker.values())

            await eventually(all_checks_in_flight)
            sidecar = stack.processes["sidecar"].popen
            sidecar.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                # Asked before worker 0 took the signal, /readyz would ping Redis, and wait
                # behind the paused scripts.
                return any(
                    '"sidecar.stopping"' in line and '"worker": 0' in line
                    for line in stack.processes["sidecar"].log().splitlines()
                )

            await eventually(draining)
            ready = await client.get(f"{stack.sideport_url}/readyz")
            # Readiness flipped while the checks still wait.
            assert (ready.status_code, ready.json()) == (503, {"status": "shutting_down"})
            await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            responses = await asyncio.gather(*requests)

        assert [r.status_code for r in responses] == [200] * len(proofs)
        assert await asyncio.to_thread(sidecar.wait, 20) == 0
        await redis.aclose()
        log = stack.processes["sidecar"].log()
        assert log.count('"sidecar.stopped"') == 2
