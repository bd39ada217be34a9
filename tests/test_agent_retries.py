"""The SDK retries safely (issue #23): paid traffic through real Envoy while the two sidecar
workers are SIGKILLed in turn, every 503 re-sent by `X402Auth` with the SAME proof.

What must hold, on the transport of the run (X402_TRANSPORT): each request signs one proof
and only one (never a newly signed payment for the same request); every payment is charged
at most once; no priced request is served without its charge in the ledger; and the wallet
never counts less than the ledger charged. With the ledger's redelivery (a retry of a
charged payment passes again with the same receipt, issue #23's other half), every charged
payment is answered 200 within its retries.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from sidecar.agent import Wallet, X402Auth, receipt_of
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.payers import funded_payer
from tests.support.routes import ROUTES

VERIFY = "/api/v1/trade/verify/T-9"
PRICE = 10_000  # 0.01 USDF
AGENTS = 4


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(ROUTES, workers=2) as running:
        yield running


def worker_pids(stack: Stack) -> dict[int, int]:
    """The live pid of each worker, from the supervisor's `sidecar.started` lines."""
    pids: dict[int, int] = {}
    for line in stack.processes["sidecar"].log().splitlines():
        if '"sidecar.started"' in line:
            started = json.loads(line)
            pids[int(started["worker"])] = int(started["pid"])
    return pids


@dataclass
class Request:
    """One logical request of an agent: the proofs it sent (nonces), its final answer."""

    nonces: list[str] = field(default_factory=list)
    status: int = 0
    receipt_id: str = ""


@dataclass
class Traffic:
    stack: Stack
    wallet: Wallet
    requests: list[Request] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    unknown: int = 0  # transport errors after the retries (PaymentOutcomeUnknown)

    async def agent(self) -> None:
        auth = X402Auth(self.wallet, retries=8)
        async with httpx.AsyncClient(base_url=self.stack.url, auth=auth, timeout=10) as client:
            while not self.stop.is_set():
                request = Request()

                async def sent(outgoing: httpx.Request, into: Request = request) -> None:
                    if "x-payment" in outgoing.headers:
                        proof = json.loads(base64.b64decode(outgoing.headers["x-payment"]))
                        into.nonces.append(proof["nonce"])

                client.event_hooks["request"] = [sent]
                try:
                    response = await client.get(VERIFY)
                except httpx.TransportError:
                    self.unknown += 1
                    continue
                finally:
                    self.requests.append(request)
                request.status = response.status_code
                receipt = receipt_of(response)
                request.receipt_id = receipt.receipt_id if receipt is not None else ""

    async def kill_workers_in_turn(self, rounds: int = 2) -> None:
        for turn in range(rounds * 2):
            await asyncio.sleep(0.6)
            worker = turn % 2
            victim = worker_pids(self.stack)[worker]
            os.kill(victim, signal.SIGKILL)
            for _ in range(400):  # restarted by the supervisor
                await asyncio.sleep(0.025)
                if worker_pids(self.stack).get(worker, victim) != victim:
                    break
        await asyncio.sleep(0.6)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.agent()) for _ in range(AGENTS)]
        try:
            await self.kill_workers_in_turn()
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)


async def charges(stack: Stack, payer: str) -> tuple[Counter[str], dict[str, str], Any]:
    ledger = Ledger.from_url(stack.redis_url)
    try:
        receipts = await ledger.receipts(payer, count=10**6)
        account = await ledger.account(payer)
    finally:
        await ledger.close()
    per_nonce = Counter(str(receipt["nonce"]) for receipt in receipts)
    by_receipt = {str(receipt["receipt_id"]): str(receipt["nonce"]) for receipt in receipts}
    return per_nonce, by_receipt, account


async def test_paid_traffic_while_workers_are_killed_is_charged_once_and_served(
    stack: Stack,
) -> None:
    ledger = Ledger.from_url(stack.redis_url)
    identity: Identity = await funded_payer(ledger, 10**9)
    await ledger.close()
    wallet = Wallet(identity)
    traffic = Traffic(stack, wallet)
    await traffic.run()

    per_nonce, by_receipt, account = await charges(stack, identity.public_key)
    statuses = Counter(request.status for request in traffic.requests)
    assert statuses[200] > 0, statuses
    # One proof per request: every retry re-sent the very same payment.
    assert all(len(set(request.nonces)) <= 1 for request in traffic.requests)
    # Every payment charged at most once, and the ledger's total says the same.
    assert max(per_nonce.values(), default=1) == 1
    assert account.debited["USDF"] == len(per_nonce) * PRICE
    # No priced request served unpaid: each 200 names a charge of its own proof.
    for request in traffic.requests:
        if request.status == 200:
            assert by_receipt.get(request.receipt_id) == request.nonces[0], request
    # The wallet never counts less than what was charged.
    assert Decimal(wallet.spent("USDF")) * 10**6 >= account.debited["USDF"]
    # With redelivery (the ledger's record of each payment's outcome), every charged
    # payment is answered 200 within its retries: the charges are exactly the paid answers.
    served = {request.nonces[0] for request in traffic.requests if request.status == 200}
    answered = Counter(
        (request.status, request.nonces[0] in per_nonce)
        for request in traffic.requests
        if request.status != 200 and request.nonces
    )
    assert set(per_nonce) == served, answered
