"""The conservation-of-money workload: credits (some retried), paid requests from
concurrent payers, replays, expired proofs and suspensions through the real servicer, then
every invariant checked against the ledger (tests/test_conservation.py, and on Redis
Cluster tests/test_cluster.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import ACTIVE, SUSPENDED, Ledger
from sidecar.server.authz import Authorization
from sidecar.tools.stack import Stack
from tests.support.inprocess import check, check_request, servicer_for
from tests.support.streams import xrange

PAYERS = 24
BATCH = 16  # operations in flight at once
PRICES = {
    "/api/v1/agent/pay-api/atlas": ("0.25", 250_000),
    "/api/v1/trade/verify/T-{n}": ("0.01", 10_000),
    "/api/v1/market/signal": ("0.0005", 500),
}


@dataclass
class Books:
    """What the clients saw; the ledger must agree with it to the unit."""

    credited: Counter[str] = field(default_factory=Counter)
    receipts: dict[str, tuple[str, int]] = field(default_factory=dict)  # id → payer, amount
    spent_proofs: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    credit_keys: dict[str, tuple[str, int]] = field(default_factory=dict)


class Workload:
    def __init__(
        self, stack: Stack, servicer: Authorization, ledger: Ledger, rng: random.Random
    ) -> None:
        self.stack, self.servicer, self.ledger, self.rng = stack, servicer, ledger, rng
        self.payers = [Identity.generate() for _ in range(PAYERS)]
        self.books = Books()

    def proof(self, payer: Identity, path: str, amount: str, ttl: int) -> dict[str, str]:
        payee, expires_at = self.stack.gateway_identity.kid, int(time.time()) + ttl
        terms = protocol.direct_terms(f"GET {path}", "USDF", amount, payee, expires_at)
        return {"x-payment": protocol.encode_header(protocol.sign_proof(terms, payer))}

    async def credit(self) -> None:
        payer = self.rng.choice(self.payers)
        if self.books.credit_keys and self.rng.random() < 0.3:  # a retried top-up
            key, (payer_key, amount) = self.rng.choice(list(self.books.credit_keys.items()))
            result = await self.ledger.credit(payer_key, "USDF", amount, key)
            assert not result.applied
            self.books.outcomes["credit_retry"] += 1
            return
        amount, key = self.rng.randint(1, 3_000_000), f"k{self.rng.getrandbits(64)}"
        self.books.credit_keys[key] = (payer.public_key, amount)
        result = await self.ledger.credit(payer.public_key, "USDF", amount, key)
        assert result.applied
        self.books.credited[payer.public_key] += amount
        self.books.outcomes["credit"] += 1

    async def pay(self) -> None:
        payer = self.rng.choice(self.payers)
        template = self.rng.choice(list(PRICES))
        amount, atomic = PRICES[template]
        path = template.format(n=self.rng.randint(1, 50))
        headers = self.proof(payer, path, amount, ttl=120)
        result = await check(self.servicer, check_request("GET", path, headers))
        self.books.outcomes[result.reason] += 1
        assert result.reason in ("allow", "insufficient_funds", "payer_suspended"), result
        if result.reason == "allow":
            receipt = json.loads(base64.b64decode(result.headers["x-payment-response"]))
            assert receipt["receipt_id"] not in self.books.receipts
            self.books.receipts[receipt["receipt_id"]] = (payer.public_key, atomic)
            self.books.spent_proofs.append((payer.public_key, path, headers))

    async def replay(self) -> None:
        if not self.books.spent_proofs:
            return
        _payer, path, headers = self.rng.choice(self.books.spent_proofs)
        result = await check(self.servicer, check_request("GET", path, headers))
        self.books.outcomes[f"replay:{result.reason}"] += 1
        assert result.reason in ("nonce_reused", "payer_suspended"), result

    async def expired(self) -> None:
        payer = self.rng.choice(self.payers)
        headers = self.proof(payer, "/api/v1/market/signal", "0.0005", ttl=-5)
        result = await check(self.servicer, check_request("GET", "/api/v1/market/signal", headers))
        self.books.outcomes[f"expired:{result.reason}"] += 1
        assert result.reason == "invoice_expired"

    async def toggle(self) -> None:
        payer = self.rng.choice(self.payers)
        status = SUSPENDED if self.rng.random() < 0.25 else ACTIVE
        await self.ledger.set_status(payer.public_key, status)
        self.books.outcomes[f"status:{status}"] += 1

    async def run(self, operations: int) -> None:
        for payer in self.payers:
            await self.ledger.register(payer.public_key)
        kinds = (
            [self.credit] * 15
            + [self.pay] * 60
            + [self.replay] * 12
            + [self.expired] * 8
            + [self.toggle] * 5
        )
        done = 0
        while done < operations:
            size = min(BATCH, operations - done)
            await asyncio.gather(*(self.rng.choice(kinds)() for _ in range(size)))
            done += size
        for payer in self.payers:  # leave everyone active for the final checks
            await self.ledger.set_status(payer.public_key, ACTIVE)


async def run_and_check(stack: Stack, operations: int, seed: int) -> Books:
    """Run the workload against `stack`'s ledger (one Redis or a cluster), then check every
    invariant."""
    servicer, ledger = servicer_for(stack)
    workload = Workload(stack, servicer, ledger, random.Random(seed))
    try:
        await workload.run(operations)
        books = workload.books
        by_payer: dict[str, list[str]] = defaultdict(list)
        for receipt_id, (payer, _amount) in books.receipts.items():
            by_payer[payer].append(receipt_id)
        totals = Counter[str]()
        for payer in (p.public_key for p in workload.payers):
            account = await ledger.account(payer)
            credited, balance = account.credited.get("USDF", 0), account.balances.get("USDF", 0)
            debited = account.debited.get("USDF", 0)
            assert credited == books.credited[payer]
            assert balance == credited - debited >= 0
            stream = await ledger.receipts(payer, count=10**6)
            ids = [entry["receipt_id"] for entry in stream]
            # every debit has exactly one receipt and every receipt one debit
            assert sorted(ids) == sorted(by_payer[payer])
            assert sum(int(entry["amount"]) for entry in stream) == debited
            assert sum(books.receipts[i][1] for i in ids) == debited
            # balances recorded after each debit: never below zero at any point
            assert all(int(entry["balance"]) >= 0 for entry in stream)
            credits = await xrange(ledger.redis, f"x402:{{{payer}}}:credits", count=10**6)
            assert sum(int(fields["amount"]) for _id, fields in credits) == credited
            totals.update(credited=credited, balance=balance, debited=debited)
        assert totals["credited"] == totals["balance"] + totals["debited"]
        # the workload really exercised every path
        outcomes = books.outcomes
        assert outcomes["allow"] > 0 and outcomes["insufficient_funds"] > 0
        assert outcomes["replay:nonce_reused"] > 0 and outcomes["credit_retry"] > 0
        assert outcomes["expired:invoice_expired"] > 0 and outcomes["payer_suspended"] > 0
        print(
            f"\nconservation: {operations} operations, seed {seed}: {dict(outcomes)}; "
            f"credited {totals['credited']} = balances {totals['balance']} + "
            f"debited {totals['debited']} atomic units"
        )
        return books
    finally:
        await ledger.close()
