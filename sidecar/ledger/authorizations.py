"""EIP-3009 authorizations of the x402 `exact` scheme in the ledger: one reservation per
(authorizer, nonce) until the authorization expires, so exactly one of many copies is
verified and settled; and top-up credits, applied once per settled authorization.

Each script touches one hash tag: a reservation its authorizer's (`{evm:0x…}`), a credit
its Ed25519 payer's.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import LedgerUnavailable, NonceReused, X402Error, refusal
from sidecar.core.money import MAX_BALANCE
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import (
    ACTIVE,
    DEADLINE_PASSED,
    IDEMPOTENCY_TTL,
    Ledger,
    deadline_ms,
)
from sidecar.ledger.durability import DurableWrites

# A reservation outlives its authorization's validBefore by this much (clock skew): past
# validBefore the token itself refuses the authorization.
RESERVATION_GRACE = 120


@dataclass(frozen=True, slots=True)
class TopupCredit:
    balance: int
    applied: bool  # False: this authorization had credited the payer already
    created: bool  # the payer's account was made by this credit
    durable: bool = True  # False: the ledger did not confirm it on disk (WAITAOF short)


class Authorizations:
    def __init__(self, ledger: Ledger, durable: DurableWrites | None = None) -> None:
        self.ledger = ledger
        # money-in (a top-up's credit, an exact settlement's record) waits for durability
        self.durable = durable or DurableWrites(ledger)
        redis = ledger._redis
        self._reserve = redis.register_script(scripts.EXACT_RESERVE_SOURCE)
        self._finish = redis.register_script(scripts.source("exact_finish"))
        self._topup = redis.register_script(scripts.source("topup"))

    async def reserve(
        self,
        authorizer: str,
        key: str,
        valid_before: int,
        within: float | None = None,
        owner: str = "",
    ) -> str:
        """Take the authorization for this check; returns the reservation. NonceReused
        (with `state`: `reserved:<id>:<owner>` or `settled:<tx>:<owner>`) when another
        check holds it or has settled it. `owner`: the Ed25519 payer a top-up credits."""
        reservation = f"reserved:{secrets.token_urlsafe(12)}:{owner}"
        deadline = deadline_ms(self.ledger._pipe.timeout, within)
        keys = (keyspace.authorization(authorizer, key),)
        args = (deadline, reservation, valid_before + RESERVATION_GRACE)
        result: list[Any]
        if owner:  # a top-up: whom it credits is on disk before any money moves (reconcile)
            result, durable = await self.durable.run(
                lambda client: self._reserve(keys=keys, args=args, client=client)
            )
            if result[0] == "ok" and not durable:
                await self.release(authorizer, key, reservation)
                raise LedgerUnavailable("the ledger did not confirm the reservation on disk")
        else:
            result = await self.ledger.call(self._reserve(keys=keys, args=args))
        if result[0] == DEADLINE_PASSED:
            raise LedgerUnavailable("the ledger answered too late; nothing was reserved")
        if result[0] == NonceReused.reason:
            raise NonceReused(
                "this authorization was already used, or is being settled", state=str(result[1])
            )
        return reservation

    async def settled(self, authorizer: str, key: str, reservation: str, tx: str) -> bool:
        """The settlement landed: the authorization stays taken until it expires. Whether
        the record is known durable (DurableWrites)."""
        owner = reservation.split(":", 2)[2]
        state = f"settled:{tx}:{owner}"
        keys = (keyspace.authorization(authorizer, key),)
        args = (reservation, state, IDEMPOTENCY_TTL)  # kept as long as a top-up's credit key
        _, durable = await self.durable.run(
            lambda client: self._finish(keys=keys, args=args, client=client)
        )
        return durable

    async def release(self, authorizer: str, key: str, reservation: str) -> None:
        """Nothing moved on chain (facilitator down, payment invalid, settle refused): the
        same authorization may be sent again."""
        await self._end(authorizer, key, reservation, "")

    async def _end(self, authorizer: str, key: str, reservation: str, state: str) -> None:
        await self.ledger.call(
            self._finish(keys=(keyspace.authorization(authorizer, key),), args=(reservation, state))
        )

    async def state(self, authorizer: str, key: str) -> str:
        """An authorization's state: `reserved:<id>:<owner>`, `settled:<tx>:<owner>` or ""
        (never seen, or expired). `owner`: the Ed25519 payer of a top-up, else ""."""
        found = await self.ledger.call(
            self.ledger._redis.get(keyspace.authorization(authorizer, key))
        )
        return str(found or "")

    async def status(self, payer: str) -> str | None:
        """An Ed25519 payer's status (None: not known yet; a top-up creates it)."""
        status: str | None = await self.ledger.call(
            self.ledger._redis.hget(keyspace.account(payer), "status")
        )
        return status

    async def credit_topup(
        self, payer: str, asset: str, amount: int, source: str, tx: str
    ) -> TopupCredit:
        """Credit `amount` once per `source` (the authorization); creates the account."""
        if amount <= 0:
            raise X402Error("a credit must be a positive amount")
        keys = (
            keyspace.account(payer),
            keyspace.idempotency(payer, f"topup:{source}"),
            keyspace.credits(payer),
        )
        args = (asset, amount, IDEMPOTENCY_TTL, MAX_BALANCE, int(time.time()), source, tx)
        result: list[Any]
        result, durable = await self.durable.run(
            lambda client: self._topup(keys=keys, args=args, client=client)
        )
        if result[0] == "balance_limit":
            raise X402Error(f"a balance may not exceed {MAX_BALANCE} atomic units")
        if result[0] not in ("ok", "duplicate"):
            raise refusal(str(result[0]))
        created = result[0] == "ok" and int(result[2]) == 1
        if created:  # the index of payers is no money: outside the script (another slot)
            await self.ledger.call(self.ledger._redis.sadd(keyspace.PAYERS, payer))
        return TopupCredit(int(result[1]), result[0] == "ok", created, durable)

    async def credited(self, payer: str, source: str) -> bool:
        """Whether the top-up of `source` (`<authorization key>:<authorizer>`) credited
        `payer` (within the idempotency window)."""
        once = keyspace.idempotency(payer, f"topup:{source}")
        return bool(await self.ledger.call(self.ledger._redis.exists(once)))


__all__ = ["ACTIVE", "RESERVATION_GRACE", "Authorizations", "TopupCredit"]
