"""State channels: a deposit locked once, then one signed voucher per request.

A payer (or the operator on its behalf) locks a deposit from its balance into a channel.
Every request then carries a voucher in the payment header: "channel C owes the payee a
cumulative X, sequence n", signed by the payer. The sidecar accepts it, in one Lua
script, if n is above the last sequence and X is above the last cumulative amount by at
least the route's price and within the deposit. Closing refunds deposit - X and appends
the final voucher to the receipt stream, where settlement batches it like any receipt.

Per request the ledger does one small script and keeps no per-request record: the
channel's latest voucher is the whole of its state. Money is conserved at every step:
credited = balance + channeled (deposits of open channels) + debited.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sidecar.core import protocol
from sidecar.core.errors import (
    ChannelExists,
    InsufficientFunds,
    InvoiceMismatch,
    NonceReused,
    PaymentConflict,
    StaleVoucher,
    UnderpaidVoucher,
    UnknownChannel,
    X402Error,
    refusal,
)
from sidecar.core.pricing import Price
from sidecar.core.receipts import CHANNEL_CLOSE
from sidecar.core.vouchers import CHANNEL_ID, Voucher, new_channel_id
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import REDELIVERED, Ledger, Redelivered, retried

DEFAULT_TTL = 24 * 3600  # a channel's lifetime unless the opener says


@dataclass(frozen=True)
class Nonce:
    """A self-serve request's nonce, spent by the script that moves the money, until the
    request's expiry (unix seconds)."""

    value: str
    expires_at: int


@dataclass(frozen=True)
class ChannelState:
    channel_id: str
    payer: str
    payee: str
    asset: str
    deposit: int
    cumulative: int
    sequence: int
    status: str
    opened_at: int
    expires_at: int
    closed_at: int | None = None
    refund: int | None = None


@dataclass(frozen=True)
class ChannelClosed:
    channel_id: str
    refund: int
    balance: int  # the payer's balance after the refund
    cumulative: int
    sequence: int  # the last voucher's sequence number
    receipt_id: str
    already: bool  # it had been closed before; nothing moved now
    vouchers: int = 0  # how many vouchers the channel accepted


class Channels:
    """Open, accept vouchers, close. Every money step is one Lua script under the payer."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._redis = ledger._redis
        self._open = self._redis.register_script(scripts.CHANNEL_OPEN_SOURCE)
        self._close = self._redis.register_script(scripts.CHANNEL_CLOSE_SOURCE)

    async def open(
        self,
        payer: str,
        asset: str,
        deposit: int,
        payee: str,
        ttl: int = DEFAULT_TTL,
        channel_id: str | None = None,
        nonce: Nonce | None = None,
        now: int | None = None,
    ) -> tuple[str, int]:
        """Lock `deposit` atomic units; (channel id, balance left). A given channel id
        makes a retry safe: opening it again is refused, never a second deposit. `nonce`:
        a request the payer signed itself, spent in the same script (a replay: nonce_reused).
        The channel expires `ttl` seconds after `now` (unix seconds; default: the clock)."""
        if deposit <= 0:
            raise X402Error("a channel deposit must be a positive amount")
        if ttl <= 0:
            raise X402Error("a channel needs a positive lifetime")
        channel_id = channel_id or new_channel_id()
        if not CHANNEL_ID.fullmatch(channel_id):
            raise X402Error("channel id must be 8-64 characters of A-Z a-z 0-9 _ -")
        now = int(time.time()) if now is None else now
        keys = [keyspace.account(payer), keyspace.channel(payer, channel_id)]
        keys.append(keyspace.channels(payer))
        args: list[str | int] = [asset, deposit, channel_id, payee, now + ttl, now]
        if nonce is not None:
            keys.append(keyspace.nonce(payer, nonce.value))
            args.append(nonce.expires_at)
        result: list[Any] = await self.ledger.call(self._open(keys=keys, args=args))
        if result[0] == "ok":
            return channel_id, int(result[1])
        if result[0] == "exists":
            raise ChannelExists(f"channel {channel_id} exists already")
        raise _error(result)

    async def get(self, payer: str, channel_id: str) -> ChannelState:
        fields: dict[str, str] = await self.ledger.call(
            self._redis.hgetall(keyspace.channel(payer, channel_id))
        )
        if not fields:
            raise UnknownChannel(f"no channel {channel_id} for this payer")
        return _state(payer, channel_id, fields)

    async def close(
        self,
        payer: str,
        channel_id: str,
        only_expired: bool = False,
        nonce: Nonce | None = None,
    ) -> ChannelClosed | None:
        """Refund the rest of the deposit, settle the final voucher. Closing twice is
        harmless (already=True). None: only_expired and it has not expired. `nonce`: as
        for `open` (spent only when the answer is a close)."""
        receipt_id = protocol.new_receipt_id()
        keys = [keyspace.account(payer), keyspace.channel(payer, channel_id)]
        keys += [keyspace.channels(payer), keyspace.receipts(payer)]
        args: list[str | int] = [channel_id, receipt_id, int(time.time())]
        args.append("1" if only_expired else "0")
        if nonce is not None:
            keys.append(keyspace.nonce(payer, nonce.value))
            args.append(nonce.expires_at)
        result: list[Any] = await self.ledger.call(self._close(keys=keys, args=args))
        if result[0] == "open":
            return None
        if result[0] == "unknown_channel":
            raise UnknownChannel(f"no channel {channel_id} for this payer")
        if result[0] == NonceReused.reason:
            raise refusal(result[0], "this close request was already used (replay)")
        _status, refund, balance, cumulative, sequence, stored_receipt, vouchers = result
        return ChannelClosed(
            channel_id,
            int(refund),
            int(balance),
            int(cumulative),
            int(sequence),
            stored_receipt,
            already=result[0] == "closed",
            vouchers=int(vouchers),
        )

    async def close_entry(self, payer: str, channel_id: str) -> dict[str, str]:
        """A closed channel's receipt-stream entry, as its close appended it (receipts.body
        turns it into the close receipt settlement batches); UnknownChannel if not closed."""
        fields: dict[str, str] = await self.ledger.call(
            self._redis.hgetall(keyspace.channel(payer, channel_id))
        )
        if fields.get("status") != "closed":
            raise UnknownChannel(f"no closed channel {channel_id} for this payer")
        return {
            "kind": CHANNEL_CLOSE,
            "receipt_id": fields["receipt_id"],
            "channel_id": channel_id,
            "asset": fields["asset"],
            "amount": fields["cumulative"],
            "deposit": fields["deposit"],
            "refund": fields["refund"],
            "sequence": fields["sequence"],
            "voucher": fields.get("voucher", ""),
            "balance": fields["balance_after"],
            "issued_at": fields["closed_at"],
            "payee": fields["payee"],
        }

    async def close_expired(self, payer: str) -> list[ChannelClosed]:
        ids: set[str] = await self.ledger.call(self._redis.smembers(keyspace.channels(payer)))
        closed = []
        for channel_id in sorted(ids):
            done = await self.close(payer, channel_id, only_expired=True)
            if done is not None:
                closed.append(done)
        return closed

    async def accept(
        self,
        voucher: Voucher,
        cumulative: int,
        price: Price,
        payees: str,
        now: int,
        within: float | None = None,
        retry: Accepting | None = None,
    ) -> tuple[int, int] | Redelivered:
        """The hot path's one ledger step: (left in the channel, amount charged), or, for
        the channel's latest voucher sent again for the same request, what it recorded.
        `payees`: the gateway's key ids, space-separated; the channel's payee must be one.
        `within`: see `Ledger.run`."""
        payer = voucher.payer
        keys = (keyspace.account(payer), keyspace.channel(payer, voucher.channel_id))
        evidence = protocol.canonical_json(voucher.fields).decode()
        retry = retry or Accepting("", 0, "")
        args = (
            price.asset.code, cumulative, voucher.sequence, price.amount, now, payees, evidence,
            retry.fingerprint, retry.limit, retry.receipt_id,
        )  # fmt: skip
        return await self.ledger.run(scripts.VOUCHER, keys, args, partial(_accepted, price), within)


@dataclass(frozen=True, slots=True)
class Accepting:
    """What the voucher script records of the payment (docs/protocol.md §13): the request's
    fingerprint, how often it may be redelivered, and the receipt id it gets."""

    fingerprint: str
    limit: int
    receipt_id: str


def _accepted(price: Price, result: list[Any]) -> tuple[int, int] | Redelivered:
    """The voucher script's reply → (left in the channel, charged), a redelivery, or the
    PaymentError."""
    reason = result[0]
    if reason == "ok":
        return int(result[1]), int(result[2])
    if reason in (REDELIVERED, PaymentConflict.reason):
        return retried(result)
    if reason in (StaleVoucher.reason, UnderpaidVoucher.reason):
        cumulative = price.asset.to_decimal(int(result[2]))
        raise refusal(reason, sequence=int(result[1]), cumulative=cumulative)
    if reason == InsufficientFunds.reason:
        message = "the voucher goes beyond the channel's deposit"
        raise refusal(reason, message, balance=int(result[1]))
    if reason == InvoiceMismatch.reason:
        raise refusal(reason, "this channel holds another asset")
    raise refusal(reason)


def _state(payer: str, channel_id: str, fields: Mapping[str, str]) -> ChannelState:
    return ChannelState(
        channel_id=channel_id,
        payer=payer,
        payee=fields.get("payee", ""),
        asset=fields.get("asset", ""),
        deposit=int(fields.get("deposit", "0")),
        cumulative=int(fields.get("cumulative", "0")),
        sequence=int(fields.get("sequence", "0")),
        status=fields.get("status", ""),
        opened_at=int(fields.get("opened_at", "0")),
        expires_at=int(fields.get("expires_at", "0")),
        closed_at=int(fields["closed_at"]) if "closed_at" in fields else None,
        refund=int(fields["refund"]) if "refund" in fields else None,
    )


def _error(result: list[Any]) -> X402Error:
    reason = result[0]
    if reason == InsufficientFunds.reason:
        return refusal(reason, "the balance does not cover this deposit", balance=int(result[1]))
    if reason == NonceReused.reason:
        return refusal(reason, "this open request was already used (replay)")
    return refusal(reason)
