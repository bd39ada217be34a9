"""EIP-3009 authorizations of the x402 `exact` scheme in the ledger: one reservation per
(authorizer, nonce) until the authorization expires, so exactly one of many copies is
verified and settled; and top-up credits, applied once per settled authorization.

Each script touches one hash tag: a reservation its authorizer's (`{evm:0x…}`), a credit
its Ed25519 payer's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import LedgerUnavailable, NonceReused, X402Error, refusal
from sidecar.core.money import MAX_BALANCE
from sidecar.core.retries import Retry
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import (
    ACTIVE,
    DEADLINE_PASSED,
    IDEMPOTENCY_TTL,
    Ledger,
    Redelivered,
    deadline_ms,
    retried,
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


@dataclass(frozen=True, slots=True)
class Recording:
    """What the check records of an `exact` payment with its settlement, for its retries
    (docs/protocol.md §13): its identity and request, the redelivery limit, and what a
    redelivery re-signs (receipt_id, issued_at); `response`: what its retries are answered
    with (server/replays.py; "" none), kept if the payer keeps fewer than `per_payer`."""

    retry: Retry
    limit: int
    outcome: Mapping[str, str]
    response: str = ""
    per_payer: int = 0


def _outcome(authorizer: str, recording: Recording) -> str:
    """The payment's outcome hash, under the authorizer's hash tag."""
    return keyspace.outcome(f"evm:{authorizer.lower()}", recording.retry.identity)


class Authorizations:
    def __init__(self, ledger: Ledger, durable: DurableWrites | None = None) -> None:
        self.ledger = ledger
        # money-in (a top-up's credit, an exact settlement's record) waits for durability
        self.durable = durable or DurableWrites(ledger)
        redis = ledger._redis
        self._reserve = redis.register_script(scripts.EXACT_RESERVE_SOURCE)
        self._finish = redis.register_script(scripts.EXACT_FINISH_SOURCE)
        self._topup = redis.register_script(scripts.source("topup"))

    async def reserve(
        self,
        authorizer: str,
        key: str,
        valid_before: int,
        within: float | None = None,
        owner: str = "",
        recording: Recording | None = None,
    ) -> str | Redelivered:
        """Take the authorization for this check; returns the reservation. NonceReused
        (with `state`: `reserved:<id>:<owner>`, `pending:<tx>:<owner>` or
        `settled:<tx>:<owner>`) when another check holds it, left its settle's outcome
        unknown, or has settled it. `owner`: the Ed25519 payer a top-up credits.
        With `recording`: a payment already settled and recorded under its identity is
        redelivered (what it recorded), or a conflict for another request."""
        reservation = f"reserved:{secrets.token_urlsafe(12)}:{owner}"
        deadline = deadline_ms(self.ledger._pipe.timeout, within)
        keys = [keyspace.authorization(authorizer, key)]
        args: list[str | int] = [deadline, reservation, valid_before + RESERVATION_GRACE]
        if recording is not None:
            keys.append(_outcome(authorizer, recording))
            args += (recording.retry.fingerprint, recording.limit)
        result: list[Any]
        if owner:  # a top-up: whom it credits is on disk before any money moves (reconcile)
            result, durable = await self.durable.run(
                lambda client: self._reserve(keys=keys, args=args, client=client), keys[0]
            )
            if result[0] == "ok" and not durable:
                await self.release(authorizer, key, reservation)
                raise LedgerUnavailable("the ledger did not confirm the reservation on disk")
        else:
            result = await self.ledger.call(self._reserve(keys=keys, args=args))
        if result[0] == DEADLINE_PASSED:
            raise LedgerUnavailable("the ledger answered too late; nothing was reserved")
        if result[0] == NonceReused.reason and not str(result[1]).startswith("rcpt_"):
            raise NonceReused(
                "this authorization was already used, or is being settled", state=str(result[1])
            )
        if result[0] != "ok":
            return retried(result)
        return reservation

    async def settled(
        self,
        authorizer: str,
        key: str,
        reservation: str,
        tx: str,
        recording: Recording | None = None,
        via: str = "",
    ) -> tuple[bool, bool]:
        """The settlement landed: the authorization stays taken until it expires (at least
        as long as a top-up's credit key, for `x402 reconcile`), and with `recording`, the
        payment's outcome with it. Returns (took, durable): took False if `reservation` (a
        reservation, or a pending state) was no longer the state (another check resolved
        it first); durable whether the record is known on disk (DurableWrites)."""
        owner = reservation.split(":", 2)[2]
        state = f"settled:{tx}:{owner}"
        keys = [keyspace.authorization(authorizer, key)]
        args: list[str | int] = [reservation, state, IDEMPOTENCY_TTL]
        if recording is not None:
            keys += (_outcome(authorizer, recording), keyspace.replays(f"evm:{authorizer.lower()}"))
            outcome = {**recording.outcome, "fp": recording.retry.fingerprint}
            args += (recording.response, recording.per_payer)
            args += [item for pair in {**outcome, "transaction": tx, "via": via}.items()
                     for item in pair]  # fmt: skip
        result, durable = await self.durable.run(
            lambda client: self._finish(keys=keys, args=args, client=client), keys[0]
        )
        return result[0] == "ok", durable

    async def pending(self, authorizer: str, key: str, reservation: str, tx: str) -> str:
        """The settle's outcome is unknown and this check gives up: the state says so
        (`pending:<tx>:<owner>`), so the same authorization sent again is resolved (on
        chain) rather than refused. Returns the new state."""
        state = f"pending:{tx}:{reservation.split(':', 2)[2]}"
        await self._end(authorizer, key, reservation, state)
        return state

    async def release(self, authorizer: str, key: str, reservation: str) -> None:
        """Nothing moved on chain (facilitator down, payment invalid, settle refused): the
        same authorization may be sent again."""
        await self._end(authorizer, key, reservation, "")

    async def _end(self, authorizer: str, key: str, reservation: str, state: str) -> bool:
        result: list[Any] = await self.ledger.call(
            self._finish(keys=(keyspace.authorization(authorizer, key),), args=(reservation, state))
        )
        return bool(result[0] == "ok")

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
            lambda client: self._topup(keys=keys, args=args, client=client), keys[0]
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
