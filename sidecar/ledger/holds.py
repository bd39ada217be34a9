"""Holds in the ledger: place at check time, capture or release at the response, and the
sweep that releases holds nobody closed. Every move is one Lua script under the payer's
hash tag (lua/hold.lua, hold_close.lua, hold_sweep.lua, with holds_common.lua).

Money of a payer: credited = balance + held + debited (+ channeled) at every instant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster

from sidecar.core import retries
from sidecar.core.retries import Retry
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import NONCE_GRACE, Ledger, Redelivered, retried

CAPTURED, RELEASED, EXPIRED, NO_HOLD = "captured", "released", "hold_expired", "no_hold"
SWEEP_LIMIT = 256  # holds one sweep call releases at most (a payer with more: next pass)
SWEEP_SCAN = 500  # payers per SSCAN page of a full sweep


@dataclass(frozen=True, slots=True)
class HoldClosed:
    """What closing a hold did."""

    outcome: str  # CAPTURED, RELEASED, EXPIRED (released: past its lifetime) or NO_HOLD
    balance: int  # the payer's balance after it (0 for NO_HOLD)
    amount: int  # captured, or released (RELEASED); 0 otherwise
    record: Mapping[str, str] = field(default_factory=dict)  # the hold's receipt facts
    held: int = 0


class Holds:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._sweep = ledger._redis.register_script(scripts.HOLD_SWEEP_SOURCE)

    async def place(
        self,
        payer: str,
        nonce: str,
        asset: str,
        amount: int,
        expires_at: int,
        hold_id: str,
        lifetime_seconds: int,
        record: Mapping[str, str | int],
        within: float | None = None,
        retry: Retry | None = None,
        redelivery_limit: int = 0,
    ) -> int | Redelivered:
        """Hold `amount` for one proof, atomically with the payer, nonce and balance
        checks; the balance left, or raises the reason. `record`: the receipt facts the
        capture writes (ledger/receipts.debit_record). A retry of a payment whose hold was
        captured (`retry`: its identity and request) returns what the capture recorded, at
        most `redelivery_limit` times; then nonce_reused."""
        retry = retry or Retry(retries.identity(None, nonce), "")
        outcome = keyspace.outcome(payer, retry.identity)
        hold = {
            "asset": asset,
            "held": str(amount),
            "nonce": nonce,
            "record": {name: str(value) for name, value in record.items()},
            "outcome": outcome,
            "fp": retry.fingerprint,
        }
        keys = (
            keyspace.account(payer),
            keyspace.nonce(payer, nonce),
            keyspace.holds(payer),
            keyspace.hold_expiries(payer),
            outcome,
        )
        args = (
            asset,
            amount,
            expires_at + NONCE_GRACE,
            hold_id,
            lifetime_seconds * 1000,
            keyspace.nonce(payer, ""),
            json.dumps(hold, separators=(",", ":")),
            retry.fingerprint,
            redelivery_limit,
        )
        return await self.ledger.run(scripts.HOLD, keys, args, _placed, within)

    async def capture(
        self,
        payer: str,
        hold_id: str,
        amount: int,
        issued_at: int,
        extra: Mapping[str, str] | None = None,
        within: float | None = None,
        response: str = "",
        per_payer: int = 0,
    ) -> HoldClosed:
        """Capture up to `amount` of the hold (the rest goes back) and append its receipt,
        with `extra` facts (e.g. units). A hold past its lifetime is released instead.
        `response`: kept with the payment's outcome for its retries (server/replays.py),
        if the payer keeps fewer than `per_payer`."""
        prefix = keyspace.nonce(payer, "")
        pairs: list[str | int] = [
            hold_id,
            "capture",
            amount,
            prefix,
            issued_at,
            response,
            per_payer,
        ]
        for name, value in (extra or {}).items():
            pairs += (name, value)
        return await self._close(payer, pairs, within)

    async def release(self, payer: str, hold_id: str) -> HoldClosed:
        """Give the whole hold back and free its nonce (the same proof can be retried)."""
        pairs: list[str | int] = [hold_id, "release", 0, keyspace.nonce(payer, ""), 0, "", 0]
        return await self._close(payer, pairs, None)

    async def _close(self, payer: str, args: list[str | int], within: float | None) -> HoldClosed:
        keys = (
            keyspace.account(payer),
            keyspace.holds(payer),
            keyspace.hold_expiries(payer),
            keyspace.receipts(payer),
            keyspace.replays(payer),
        )
        return await self.ledger.run(scripts.HOLD_CLOSE, keys, args, _closed, within)

    async def sweep(self, payer: str) -> int:
        """Release the payer's holds past their lifetime; how many."""
        released = await self.ledger.call(
            self._sweep(keys=_sweep_keys(payer), args=(keyspace.nonce(payer, ""), SWEEP_LIMIT))
        )
        return int(released)

    async def sweep_all(self) -> int:
        """One pass over every registered payer (worker 0's sweeper); holds released."""
        released, cursor = 0, 0
        redis: Any = self.ledger._redis
        while True:
            cursor, payers = await self.ledger.call(
                redis.sscan(keyspace.PAYERS, cursor, count=SWEEP_SCAN)
            )
            if isinstance(redis, RedisCluster):
                for payer in payers:
                    released += await self.sweep(payer)
            else:
                pipe = redis.pipeline(transaction=False)
                for payer in payers:
                    await self._sweep(
                        keys=_sweep_keys(payer),
                        args=(keyspace.nonce(payer, ""), SWEEP_LIMIT),
                        client=pipe,
                    )
                if payers:
                    released += sum(int(n) for n in await self.ledger.call(pipe.execute()))
            if int(cursor) == 0:
                return released

    async def open_holds(self, payer: str) -> int:
        """How many holds the payer has open (tests, the admin view)."""
        return int(await self.ledger.call(self.ledger._redis.hlen(keyspace.holds(payer))))


def _sweep_keys(payer: str) -> tuple[str, str, str]:
    return keyspace.account(payer), keyspace.holds(payer), keyspace.hold_expiries(payer)


def _placed(result: list[Any]) -> int | Redelivered:
    if result[0] == "ok":
        return int(result[1])
    return retried(result)


def _closed(result: list[Any]) -> HoldClosed:
    outcome = str(result[0])
    if outcome == NO_HOLD:
        return HoldClosed(NO_HOLD, 0, 0)
    hold = json.loads(result[3])
    return HoldClosed(outcome, int(result[1]), int(result[2]), hold["record"], int(hold["held"]))
