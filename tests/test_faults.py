"""Faults injected under load through real Envoy: priced routes fail closed, the stack
recovers by itself, and no payment is lost or charged twice.

Every proof sent is accounted for: it was answered 200 (charged once), or refused before
the ledger, or its answer was lost in the fault — then its retry is 200 (charged then, or
redelivered uncharged: docs/protocol.md §13) or nonce_reused,
and the ledger holds exactly one receipt per charged nonce.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis

from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.payers import funded_payer, pay_direct
from tests.support.routes import ROUTES
from tests.support.streams import raw

VERIFY = "/api/v1/trade/verify/T-7"
PRICE = 10_000  # 0.01 USDF
FREE = "/api/v1/health"
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")  # kill -9 loses nothing


@dataclass
class Traffic:
    """Paid requests from several agents while a fault comes and goes."""

    stack: Stack
    wallet: Identity
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # nonce, status, reason
    proofs: dict[str, dict[str, str]] = field(default_factory=dict)  # nonce → headers
    free_statuses: Counter[int] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def agent(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            headers = pay_direct(self.stack, self.wallet, f"GET {VERIFY}", "0.01")
            nonce = json.loads(base64.b64decode(headers["X-Payment"]))["nonce"]
            self.proofs[nonce] = headers
            response = await client.get(VERIFY, headers=headers)
            self.answers.append((nonce, response.status_code, reason_of(response)))

    async def free_client(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            self.free_statuses[(await client.get(FREE)).status_code] += 1
            await asyncio.sleep(0.01)

    async def run(self, fault: Callable[[], Awaitable[None]], agents: int = 6) -> None:
        async with httpx.AsyncClient(base_url=self.stack.url, timeout=10) as client:
            tasks = [asyncio.create_task(self.agent(client)) for _ in range(agents)]
            tasks.append(asyncio.create_task(self.free_client(client)))
            await fault()
            self.stop.set()
            await asyncio.gather(*tasks)

    async def retry_unanswered(self) -> dict[str, str]:
        """Send again every proof whose answer was lost; how each retry ended."""
        lost = {nonce for nonce, status, _reason in self.answers if status == 503}
        async with httpx.AsyncClient(base_url=self.stack.url, timeout=10) as client:
            retries = {n: reason_of(await client.get(VERIFY, headers=self.proofs[n])) for n in lost}
        assert set(retries.values()) <= {"paid", "nonce_reused"}, retries
        return retries

    async def assert_each_payment_charged_once(
        self, retries: dict[str, str], credited: int
    ) -> None:
        paid = {nonce for nonce, status, _reason in self.answers if status == 200}
        charged_late = {nonce for nonce, reason in retries.items() if reason == "nonce_reused"}
        paid |= {nonce for nonce, reason in retries.items() if reason == "paid"}
        ledger = Ledger.from_url(self.stack.redis_url)
        try:
            receipts = await ledger.receipts(self.wallet.public_key, count=10**6)
            account = await ledger.account(self.wallet.public_key)
        finally:
            await ledger.close()
        nonces = Counter(receipt["nonce"] for receipt in receipts)
        assert max(nonces.values(), default=1) == 1  # never charged twice
        assert set(nonces) == paid | charged_late  # every charge answered or accounted for
        assert account.debited["USDF"] == len(nonces) * PRICE
        assert account.balances["USDF"] == credited - len(nonces) * PRICE >= 0


def reason_of(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "paid"
    try:
        return str(response.json()["error"])
    except ValueError:
        return f"envoy:{response.status_code}"  # Envoy's own answer: no JSON body


async def eventually_paid(stack: Stack, wallet: Identity) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        for _ in range(200):
            headers = pay_direct(stack, wallet, f"GET {VERIFY}", "0.01")
            if (await client.get(VERIFY, headers=headers)).status_code == 200:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the stack did not recover")


async def test_redis_killed_mid_load() -> None:
    with Stack(ROUTES, redis_args=DURABLE) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 10**9)
        await ledger.close()
        traffic = Traffic(stack, wallet)

        async def fault() -> None:
            await asyncio.sleep(0.8)
            stack.processes["redis"].kill()
            await asyncio.sleep(1.0)
            stack.start_redis()  # the same data (AOF), an empty script cache
            await asyncio.sleep(0.8)

        await traffic.run(fault)
        statuses = Counter(status for _n, status, _r in traffic.answers)
        reasons = Counter(reason for _n, status, reason in traffic.answers if status != 200)
        assert set(statuses) <= {200, 503}, statuses  # never a 500, never a free pass
        assert statuses[503] > 0 and set(reasons) == {"ledger_unavailable"}
        assert traffic.free_statuses == Counter({200: traffic.free_statuses[200]})
        # It recovered by itself: requests after the restart were paid.
        last = [status for _n, status, _r in traffic.answers[-6:]]
        assert 200 in last
        await traffic.assert_each_payment_charged_once(await traffic.retry_unanswered(), 10**9)


async def test_sidecar_killed_and_restarted_mid_load() -> None:
    with Stack(ROUTES) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 10**9)
        await ledger.close()
        traffic = Traffic(stack, wallet)

        async def fault() -> None:
            await asyncio.sleep(0.8)
            sidecar = stack.processes["sidecar"].popen
            os.killpg(sidecar.pid, signal.SIGKILL)  # the supervisor and every worker
            sidecar.wait()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(stack.start_sidecar)
            await asyncio.sleep(0.8)

        await traffic.run(fault)
        statuses = Counter(status for _n, status, _r in traffic.answers)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[503] > 0  # Envoy's status_on_error while nobody answered
        assert 200 in [status for _n, status, _r in traffic.answers[-6:]]
        await traffic.assert_each_payment_charged_once(await traffic.retry_unanswered(), 10**9)


async def test_ext_authz_timeout_is_503_charges_nothing_and_the_retry_pays_once() -> None:
    # A sidecar slower than Envoy is willing to wait (here: Redis stalls): Envoy gives up.
    # The debit script's deadline follows Envoy's (the gRPC deadline), so the stalled debit
    # refuses when Redis resumes: the 503 charged nothing and the same proof then pays.
    with Stack(ROUTES, settings={"redis_timeout_ms": 5000}, authz_timeout="0.3s") as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 1_000_000)
        headers = pay_direct(stack, wallet, f"GET {VERIFY}", "0.01")
        admin = aioredis.Redis.from_url(stack.redis_url)
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            # Redis stalls
            await admin.execute_command("CLIENT", "PAUSE", "1800")  # type: ignore[no-untyped-call]
            timed_out = await client.get(VERIFY, headers=headers)
            assert timed_out.status_code == 503  # Envoy's status_on_error, not a free pass
            retried = timed_out
            for _ in range(100):  # the agent retries the same proof until Redis is back
                await asyncio.sleep(0.1)
                retried = await client.get(VERIFY, headers=headers)
                if retried.status_code != 503:
                    break
        await admin.aclose()
        assert retried.status_code == 200, retried.text
        account = await ledger.account(wallet.public_key)
        receipts = await ledger.receipts(wallet.public_key)
        await ledger.close()
        assert account.balances["USDF"] == 1_000_000 - PRICE  # charged exactly once
        assert len(receipts) == 1


async def test_script_cache_flushed_mid_load_costs_nothing() -> None:
    with Stack(ROUTES) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 10**9)
        traffic = Traffic(stack, wallet)

        async def fault() -> None:
            for _ in range(3):
                await asyncio.sleep(0.3)
                await raw(ledger).script_flush()

        await traffic.run(fault)
        await ledger.close()
        assert {status for _n, status, _r in traffic.answers} == {200}
        await traffic.assert_each_payment_charged_once({}, 10**9)
        await eventually_paid(stack, wallet)
