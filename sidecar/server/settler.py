"""One on-chain authorization settled at most once through the facilitator
(server/facilitation.py): reserved in the ledger (concurrent and replayed copies stop
there), /verify, /settle; a settle whose outcome is unknown is resolved on chain, or left
pending for the same authorization sent again (settlement_pending). Shared by the `exact`
and `upto` schemes (server/schemes/) and the top-up route (server/topup.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

from sidecar.core import exact
from sidecar.core.errors import (
    FacilitatorUnavailable,
    InvalidPayment,
    NonceReused,
    PaymentError,
    SettlementFailed,
    SettlementPending,
)
from sidecar.core.exact import Eip3009Authorization
from sidecar.core.protocol import Offer
from sidecar.ledger.accounts import Redelivered
from sidecar.ledger.authorizations import Authorizations, Recording
from sidecar.server.facilitation import ChainReader, FacilitatorClient, SettleUnknown
from sidecar.server.logs import get_logger

log = get_logger("sidecar.exact")


SETTLEMENT_PENDING = SettlementPending.reason  # the standard's errorReason (x402 2.25)


class Reservable(Protocol):
    """A signed on-chain authorization the ledger reserves and the facilitator verifies:
    `exact`'s EIP-3009 one, `upto`'s Permit2 one (core/upto.py)."""

    @property
    def payer(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def valid_before(self) -> int: ...
    @property
    def envelope(self) -> Mapping[str, Any]: ...
    @property
    def requirements(self) -> Offer: ...


class ExactSettler:
    """One EIP-3009 authorization, settled at most once through the facilitator: reserve
    it in the ledger (concurrent and replayed copies stop here), /verify, /settle. Shared
    by the `exact` scheme and the top-up route."""

    RESOLVE_INTERVAL = 0.5  # seconds between two looks at the chain

    def __init__(
        self,
        authorizations: Authorizations,
        facilitator: FacilitatorClient,
        chain: ChainReader | None,
        lookup: float = 3.0,  # seconds the chain is watched for a settle whose answer was lost
    ) -> None:
        self.authorizations, self.facilitator, self.chain = authorizations, facilitator, chain
        self.lookup = lookup

    async def close(self) -> None:
        await self.facilitator.close()
        if self.chain is not None:
            await self.chain.close()

    async def settle(
        self, auth: Eip3009Authorization, within: float | None = None, owner: str = ""
    ) -> dict[str, str]:
        """The settled facts (transaction, network, token, nonce, via), or a typed refusal:
        nonce_reused, facilitator_unavailable (503), invalid_payment, settlement_failed.
        `owner`: who a top-up credits, kept with the reservation."""
        reservation = await self.verify(auth, within, owner)
        return await self.settle_reserved(auth, reservation)

    async def settle_recorded(
        self, auth: Eip3009Authorization, within: float | None, recording: Recording
    ) -> dict[str, str] | Redelivered:
        """`settle`, the outcome recorded with the settlement; a payment already recorded
        is redelivered: what it recorded, nothing verified or settled (protocol.md §13)."""
        reservation = await self.verify_recorded(auth, within, recording)
        if isinstance(reservation, Redelivered):
            return reservation
        return await self.settle_reserved(auth, reservation, recording)

    async def verify_recorded(
        self, auth: Eip3009Authorization, within: float | None, recording: Recording
    ) -> str | Redelivered:
        """`verify` for a payment whose outcome the settle will record: one already
        recorded is redelivered (what it recorded), nothing verified (protocol.md §13)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, recording=recording
        )
        if not isinstance(reservation, Redelivered):
            await self.verified(auth, reservation)
        return reservation

    async def verify(self, auth: Reservable, within: float | None = None, owner: str = "") -> str:
        """The first half: reserve the authorization in the ledger (until it expires) and
        /verify it; the reservation, or a typed refusal with nothing reserved (a verify
        moves nothing: the same authorization may come again)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, owner
        )
        assert isinstance(reservation, str)  # nothing recorded, nothing redelivered
        await self.verified(auth, reservation)
        return reservation

    async def verified(self, auth: Reservable, reservation: str) -> None:
        """/verify a reserved authorization; a refusal frees the reservation."""
        try:
            verified = await self.facilitator.verify(auth.envelope, auth.requirements.to_wire())
        except FacilitatorUnavailable:
            await self.release(auth, reservation)
            raise
        if not verified.valid:
            await self.release(auth, reservation)
            raise InvalidPayment(
                verified.message or "the facilitator found the authorization invalid",
                facilitator_reason=verified.reason or "invalid",
            )

    async def release(self, auth: Reservable, reservation: str) -> None:
        """Nothing moved on chain: free the authorization (if still this reservation's)."""
        with contextlib.suppress(PaymentError):  # the reservation then simply expires
            await self.authorizations.release(auth.payer, auth.key, reservation)

    async def settle_reserved(
        self, auth: Eip3009Authorization, reservation: str, recording: Recording | None = None
    ) -> dict[str, str]:
        """The second half: /settle a verified, reserved authorization. An unknown outcome
        is resolved on chain; unresolved, the authorization is left `pending` and the
        answer is 503 settlement_pending: the same authorization, sent again, is resolved
        then (recover), never settled twice."""
        via = "facilitator"
        try:
            settled = await self.facilitator.settle(auth.envelope, auth.requirements.to_wire())
        except SettleUnknown:
            via, transaction = "chain", await self.resolve(auth, reservation)
        except FacilitatorUnavailable:
            await self.release(auth, reservation)  # the request never reached the facilitator
            raise
        else:
            if settled.success and settled.transaction:
                transaction = settled.transaction
            elif settled.transaction:  # sent, then failed or pending: look at the chain
                failed = "" if settled.reason == SETTLEMENT_PENDING else settled.reason
                via = "chain"
                transaction = await self.resolve(auth, reservation, settled.transaction, failed)
            else:
                await self.release(auth, reservation)
                reason = settled.reason or "settle_failed"
                message = settled.message or "the settlement failed; nothing was charged"
                raise SettlementFailed(
                    message,
                    exact.settle_response(auth, "", reason, message),
                    facilitator_reason=reason,
                )
        durable = False
        with contextlib.suppress(PaymentError):  # settled on chain: the reservation holds
            _, durable = await self.authorizations.settled(
                auth.payer, auth.key, reservation, transaction, recording, via
            )
        if not durable:  # the transfer is on chain (x402 reconcile finds it); say so
            log.warning("exact.record_not_durable", authorizer=auth.payer, transaction=transaction)
        return {**settled_facts(auth, transaction), "via": via}

    async def resolve(
        self, auth: Eip3009Authorization, reservation: str, sent: str = "", failed: str = ""
    ) -> str:
        """A settle whose outcome is unknown (`sent`: the transaction the facilitator named,
        if any): its transaction if the chain shows the authorization used; else
        settlement_failed after a transaction the facilitator saw fail, or the
        authorization is left pending (503 settlement_pending)."""
        found = await self.landed(auth)
        if found is not None:
            return found or sent or "unknown"
        if failed:  # the reservation stays until the authorization expires
            message = "the settlement transaction failed; nothing was charged"
            raise SettlementFailed(
                message, exact.settle_response(auth, "", failed, message), facilitator_reason=failed
            )
        with contextlib.suppress(PaymentError):  # else it stays `reserved`: refused as today
            await self.authorizations.pending(auth.payer, auth.key, reservation, sent)
        raise pending(auth, sent)

    async def landed(self, auth: Eip3009Authorization, resettle: bool = False) -> str | None:
        """Did the authorization land? Its transaction ("" when the chain shows it used but
        the log is not found), or None when the lookup window (`lookup` seconds) passed
        without seeing it. `resettle`: ask the facilitator first (/settle again: the token
        takes an authorization once, so this never moves money twice). A failed chain read
        is retried inside the window, not taken for an answer."""
        if resettle:
            with contextlib.suppress(FacilitatorUnavailable):
                again = await self.facilitator.settle(auth.envelope, auth.requirements.to_wire())
                if again.success and again.transaction:
                    return again.transaction
        if self.chain is None:
            return None
        token = auth.requirements.asset
        deadline = time.monotonic() + self.lookup
        while True:
            with contextlib.suppress(FacilitatorUnavailable):  # a failed read: look again
                if await self.chain.authorization_used(token, auth.payer, auth.nonce):
                    with contextlib.suppress(FacilitatorUnavailable):
                        return await self.chain.transaction_of(token, auth.payer, auth.nonce)
                    return ""
            if time.monotonic() + self.RESOLVE_INTERVAL > deadline:
                return None
            await asyncio.sleep(self.RESOLVE_INTERVAL)

    async def recover(
        self,
        auth: Eip3009Authorization,
        reused: NonceReused,
        owner: str = "",
        recording: Recording | None = None,
    ) -> dict[str, str]:
        """The same authorization sent again, found taken in the ledger (`reused`, its
        `state`). Only `owner`'s (a top-up's payer; "" on a paid route) is resolved: one
        left pending, or (a top-up) one whose chain transfer an earlier attempt could not
        credit; the settled facts when it landed, and a pending one is taken over by this
        check alone (another re-sent copy gets nonce_reused). A paid route's authorization
        that was settled, or is still being settled, stays a replay (nonce_reused)."""
        state = str(reused.details.get("state", ""))
        kind, _, rest = state.partition(":")
        found, _, holder = rest.rpartition(":")
        if holder != owner or kind not in ("pending", "reserved", "settled"):
            raise reused
        if kind != "pending" and not owner:
            raise reused
        if kind == "settled" and found:
            return {**settled_facts(auth, found), "via": "chain"}
        landed = await self.landed(auth, resettle=kind == "pending")
        if landed is None:
            if kind == "pending":
                raise pending(auth, found)
            raise NonceReused("this authorization is being settled; try again shortly")
        transaction = landed or found or "unknown"
        if kind == "pending":
            took, _ = await self.authorizations.settled(
                auth.payer, auth.key, state, transaction, recording, "chain"
            )  # recorded: its own retries are redelivered from now on
            if not took:
                raise reused
        return {**settled_facts(auth, transaction), "via": "chain"}


def pending(auth: Eip3009Authorization, transaction: str) -> SettlementPending:
    """The answer to a settle whose outcome is still unknown: send the same again."""
    known = {"transaction": transaction} if transaction else {}
    return SettlementPending(
        "the settlement's outcome is not known yet; the money may have moved: send this "
        "same payment again after Retry-After (never a new one): it is settled at most once",
        **known,
        network=auth.requirements.network,
    )


def settled_facts(auth: Eip3009Authorization, transaction: str) -> dict[str, str]:
    return {
        "transaction": transaction,
        "network": auth.requirements.network,
        "token": auth.requirements.asset,
        "nonce": auth.nonce,
    }
