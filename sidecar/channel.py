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

import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from sidecar import keyspace, metrics, protocol
from sidecar.decision import Allow, Gateway, carrying, payer_key
from sidecar.decision import Request as HttpRequest
from sidecar.errors import (
    BY_REASON,
    AmountError,
    InsufficientFunds,
    InvalidSignature,
    InvoiceMismatch,
    LedgerUnavailable,
    MalformedPayment,
    PaymentError,
    StaleVoucher,
    UnderpaidVoucher,
    UnsupportedScheme,
    X402Error,
)
from sidecar.identity import Identity, verify
from sidecar.ledger import DEADLINE_PASSED, MAX_BALANCE, Ledger, deadline_ms, lua_script, too_late
from sidecar.money import Asset
from sidecar.pricing import Price
from sidecar.redis_pipe import RedisPipeError, Script

SCHEME = "channel-ed25519"
VOUCHER_DOMAIN = b"fth-x402/2.0 voucher\n"
VOUCHER_FIELDS: dict[str, type] = {
    "version": str,
    "scheme": str,
    "channel_id": str,
    "asset": str,
    "cumulative": str,
    "sequence": int,
    "resource": str,
    "payee": str,
    "payer": str,
    "signature": str,
}
CHANNEL_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
DEFAULT_TTL = 24 * 3600
OPEN, CLOSED = "open", "closed"

VOUCHER = Script(lua_script("channel_voucher"))


# -- the voucher (pure) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Voucher:
    channel_id: str
    asset: str
    cumulative: str  # decimal string, as signed
    sequence: int
    resource: str
    payee: str
    payer: str
    signature: str
    signed_message: bytes
    fields: Mapping[str, Any]  # the object as received: kept as the channel's evidence


def new_channel_id() -> str:
    return "ch_" + secrets.token_urlsafe(16)


def voucher_from(obj: Mapping[str, Any]) -> Voucher:
    """A decoded payment object (protocol.decode_payment) → Voucher, or a typed 400."""
    if obj.get("scheme") != SCHEME:
        raise UnsupportedScheme(f"scheme must be {SCHEME!r}")
    protocol.check_fields(obj, VOUCHER_FIELDS)
    if obj["sequence"] < 1:
        raise MalformedPayment("voucher sequence must be a positive integer")
    if not CHANNEL_ID.fullmatch(obj["channel_id"]):
        raise MalformedPayment("channel_id must be 8-64 characters of A-Z a-z 0-9 _ -")
    unsigned = {k: v for k, v in obj.items() if k != "signature"}
    return Voucher(
        channel_id=obj["channel_id"],
        asset=obj["asset"],
        cumulative=obj["cumulative"],
        sequence=obj["sequence"],
        resource=obj["resource"],
        payee=obj["payee"],
        payer=obj["payer"],
        signature=obj["signature"],
        signed_message=VOUCHER_DOMAIN + protocol.canonical_json(unsigned),
        fields=obj,
    )


def parse_voucher(value: str, max_bytes: int) -> Voucher:
    return voucher_from(protocol.decode_payment(value, max_bytes))


def sign_voucher(terms: Mapping[str, Any], wallet: Identity) -> dict[str, Any]:
    """Client side: sign `terms` (channel_id, asset, cumulative, sequence, resource,
    payee); version, scheme and payer are filled in."""
    fields: dict[str, Any] = {
        "version": protocol.VERSION,
        "scheme": SCHEME,
        **{k: terms[k] for k in VOUCHER_FIELDS if k in terms},
        "payer": wallet.public_key,
    }
    fields.pop("signature", None)
    fields["signature"] = wallet.sign(VOUCHER_DOMAIN + protocol.canonical_json(fields))
    return fields


def verify_signature(voucher: Mapping[str, Any]) -> bool:
    """The payer's signature on a voucher object (offline: evidence bundles)."""
    try:
        parsed = voucher_from(voucher)
        key = payer_key(parsed.payer)
    except (PaymentError, ValueError):
        return False
    return verify(key, parsed.signed_message, parsed.signature)


def verify_voucher(voucher: Voucher, request: HttpRequest, price: Price, gateway: Gateway) -> int:
    """Every check that needs no ledger, cheapest first; the cumulative amount (atomic)."""
    if voucher.resource != request.resource:
        raise InvoiceMismatch(f"voucher is for {voucher.resource!r}, not {request.resource!r}")
    if voucher.asset != price.asset.code:
        raise InvoiceMismatch(f"this route is priced in {price.asset.code}, not {voucher.asset}")
    if voucher.payee != gateway.payee:
        raise InvoiceMismatch(
            f"voucher is for payee {voucher.payee!r}, this gateway is {gateway.payee!r}"
        )
    try:
        cumulative = price.asset.to_atomic(voucher.cumulative)
    except AmountError as exc:
        raise MalformedPayment(f"voucher cumulative: {exc}") from None
    if cumulative > MAX_BALANCE:
        raise MalformedPayment("voucher cumulative is beyond any deposit")
    try:
        key = payer_key(voucher.payer)
    except ValueError:
        raise MalformedPayment("payer is not a base64url Ed25519 public key") from None
    if not verify(key, voucher.signed_message, voucher.signature):
        raise InvalidSignature("the voucher signature does not verify for this payer")
    return cumulative


def allow(
    voucher: Voucher,
    price: Price,
    cumulative: int,
    increment: int,
    remaining: int,
    receipt_id: str,
    gateway: Gateway,
    now: int,
) -> Allow:
    """After the ledger accepted the voucher: a signed receipt, as for any payment."""
    asset = price.asset
    receipt = protocol.sign_receipt(
        {
            "version": protocol.VERSION,
            "success": True,
            "receipt_id": receipt_id,
            "scheme": SCHEME,
            "channel_id": voucher.channel_id,
            "sequence": voucher.sequence,
            "cumulative": asset.to_decimal(cumulative),
            "payer": voucher.payer,
            "payee": gateway.payee,
            "resource": voucher.resource,
            "asset": asset.code,
            "amount": asset.to_decimal(increment),
            "balance": asset.to_decimal(remaining),  # left in the channel
            "issued_at": now,
        },
        gateway.identity,
    )
    return carrying(receipt)


def close_receipt_body(payer: str, entry: Mapping[str, str], asset: Asset) -> dict[str, Any]:
    """The receipt of a channel close, from its receipt-stream entry (to be signed).

    It carries the payer's final voucher, so an auditor can check that the payer itself
    signed for the amount settled.
    """
    try:
        body: dict[str, Any] = {
            "version": protocol.VERSION,
            "success": True,
            "receipt_id": entry["receipt_id"],
            "scheme": SCHEME,
            "channel_id": entry["channel_id"],
            "payer": payer,
            "payee": entry["payee"],
            "asset": asset.code,
            "amount": asset.to_decimal(int(entry["amount"])),
            "deposit": asset.to_decimal(int(entry["deposit"])),
            "refund": asset.to_decimal(int(entry["refund"])),
            "sequence": int(entry["sequence"]),
            "balance": asset.to_decimal(int(entry["balance"])),
            "issued_at": int(entry["issued_at"]),
        }
        if entry["voucher"]:
            body["voucher"] = json.loads(entry["voucher"])
    except (KeyError, ValueError) as exc:
        raise X402Error(
            f"receipt {entry.get('receipt_id')}: malformed channel entry ({exc})"
        ) from None
    return body


# -- the ledger side --------------------------------------------------------------------


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
class Closed:
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
        self.redis = ledger.redis
        self._open = self.redis.register_script(lua_script("channel_open"))
        self._close = self.redis.register_script(lua_script("channel_close"))

    async def open(
        self,
        payer: str,
        asset: str,
        deposit: int,
        payee: str,
        ttl: int = DEFAULT_TTL,
        channel_id: str | None = None,
    ) -> tuple[str, int]:
        """Lock `deposit` atomic units; (channel id, balance left). A given channel id
        makes a retry safe: opening it again is refused, never a second deposit."""
        if deposit <= 0:
            raise X402Error("a channel deposit must be a positive amount")
        if ttl <= 0:
            raise X402Error("a channel needs a positive lifetime")
        channel_id = channel_id or new_channel_id()
        if not CHANNEL_ID.fullmatch(channel_id):
            raise X402Error("channel id must be 8-64 characters of A-Z a-z 0-9 _ -")
        now = int(time.time())
        result: list[Any] = await self._call(
            self._open(
                keys=(
                    keyspace.account(payer),
                    keyspace.channel(payer, channel_id),
                    keyspace.channels(payer),
                ),
                args=(asset, deposit, channel_id, payee, now + ttl, now),
            )
        )
        if result[0] == "ok":
            return channel_id, int(result[1])
        if result[0] == "exists":
            raise X402Error(f"channel {channel_id} exists already")
        raise _error(result)

    async def get(self, payer: str, channel_id: str) -> ChannelState:
        fields: dict[str, str] = await self._call(
            self.redis.hgetall(keyspace.channel(payer, channel_id))
        )
        if not fields:
            raise X402Error(f"no channel {channel_id} for this payer")
        return _state(payer, channel_id, fields)

    async def open_channels(self, payer: str) -> list[ChannelState]:
        """The payer's open channels."""
        ids: set[str] = await self._call(self.redis.smembers(keyspace.channels(payer)))
        return [await self.get(payer, channel_id) for channel_id in sorted(ids)]

    async def close(self, payer: str, channel_id: str, only_expired: bool = False) -> Closed | None:
        """Refund the rest of the deposit, settle the final voucher. Closing twice is
        harmless (already=True). None: only_expired and it has not expired."""
        receipt_id = protocol.new_receipt_id()
        result: list[Any] = await self._call(
            self._close(
                keys=(
                    keyspace.account(payer),
                    keyspace.channel(payer, channel_id),
                    keyspace.channels(payer),
                    keyspace.receipts(payer),
                ),
                args=(channel_id, receipt_id, int(time.time()), "1" if only_expired else "0"),
            )
        )
        if result[0] == "open":
            return None
        if result[0] == "unknown_channel":
            raise X402Error(f"no channel {channel_id} for this payer")
        _status, refund, balance, cumulative, sequence, stored_receipt, vouchers = result
        return Closed(
            channel_id,
            int(refund),
            int(balance),
            int(cumulative),
            int(sequence),
            stored_receipt,
            already=result[0] == "closed",
            vouchers=int(vouchers),
        )

    async def close_expired(self, payer: str) -> list[Closed]:
        ids: set[str] = await self._call(self.redis.smembers(keyspace.channels(payer)))
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
        payee: str,
        now: int,
        late: Callable[[tuple[int, int] | PaymentError], None] | None = None,
        within: float | None = None,
    ) -> tuple[int, int]:
        """The hot path's one ledger step: (left in the channel, amount charged).

        `late`: if the caller is cancelled (Envoy gave up on the check) once the script is
        sent, Redis may still accept the voucher; `late` then gets the outcome."""
        payer = voucher.payer
        keys = (keyspace.account(payer), keyspace.channel(payer, voucher.channel_id))
        evidence = protocol.canonical_json(voucher.fields).decode()
        args = (
            *(price.asset.code, cumulative, voucher.sequence, price.amount, now, payee, evidence),
            deadline_ms(self.ledger.pipe.timeout, within),
        )
        listener = None if late is None else lambda reply: late(_late_outcome(reply, price))
        try:
            result: list[Any] = await self.ledger.pipe.evalsha(VOUCHER, keys, args, listener)
        except RedisPipeError as exc:
            raise _unavailable(exc) from exc
        return _accepted(result, price)

    async def pay(
        self,
        voucher: Voucher,
        request: HttpRequest,
        price: Price,
        gateway: Gateway,
        now: int,
        entry: dict[str, Any],
        limit: Callable[[], Awaitable[None]] | None = None,
        late: Callable[[], None] | None = None,
        within: float | None = None,
    ) -> Allow:
        """The servicer's channel path: verify, accept, sign the receipt; fills the
        decision log `entry`; raises a typed PaymentError. `limit`: the rate limiter, run
        once the voucher's signature holds (so only the payer spends its allowance).
        `late()`: called if Envoy gave up on the check while Redis had the voucher, once
        `entry` says what became of it (so an accepted voucher still gets its log line)."""
        entry["payer"] = voucher.payer
        entry["channel_id"] = voucher.channel_id
        cumulative = verify_voucher(voucher, request, price, gateway)
        if limit is not None:
            await limit()
        receipt_id = protocol.new_receipt_id()

        def outcome(result: tuple[int, int] | PaymentError) -> None:
            entry["cancelled"] = True
            if isinstance(result, PaymentError):
                entry.update(decision="deny", status=result.status, reason=result.reason)
            else:
                _accepted_entry(entry, price, receipt_id, *result)
            if late is not None:
                late()

        remaining, increment = await self.accept(
            voucher,
            cumulative,
            price,
            gateway.payee,
            now,
            None if late is None else outcome,
            within,
        )
        allowed = allow(voucher, price, cumulative, increment, remaining, receipt_id, gateway, now)
        _accepted_entry(entry, price, receipt_id, remaining, increment)
        return allowed

    @staticmethod
    async def _call(op: Any) -> Any:
        try:
            return await op
        except (RedisError, OSError) as exc:
            raise LedgerUnavailable(f"ledger unavailable ({exc.__class__.__name__})") from exc


def _accepted_entry(
    entry: dict[str, Any], price: Price, receipt_id: str, remaining: int, increment: int
) -> None:
    metrics.revenue(price.asset.code, price.route, increment)
    entry.update(
        decision="allow",
        status=200,
        reason="channel",
        receipt_id=receipt_id,
        balance=price.asset.to_decimal(remaining),
    )


def _unavailable(exc: RedisPipeError) -> LedgerUnavailable:
    # Fail closed; the exception class tells the operator why, without secrets.
    return LedgerUnavailable(f"ledger unavailable ({exc.__class__.__name__})")


def _accepted(result: list[Any], price: Price) -> tuple[int, int]:
    """The voucher script's reply → (left in the channel, charged), or the PaymentError."""
    reason = result[0]
    if reason == "ok":
        return int(result[1]), int(result[2])
    if reason == DEADLINE_PASSED:
        raise too_late()
    if reason in (StaleVoucher.reason, UnderpaidVoucher.reason):
        error_type = StaleVoucher if reason == StaleVoucher.reason else UnderpaidVoucher
        raise error_type(
            _MESSAGES[reason],
            sequence=int(result[1]),
            cumulative=price.asset.to_decimal(int(result[2])),
        )
    if reason == InsufficientFunds.reason:
        raise InsufficientFunds(_MESSAGES[reason], balance=int(result[1]))
    raise BY_REASON[reason](_MESSAGES[reason])


def _late_outcome(reply: Any, price: Price) -> tuple[int, int] | PaymentError:
    if isinstance(reply, RedisPipeError):
        return _unavailable(reply)
    try:
        return _accepted(reply, price)
    except PaymentError as error:
        return error


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
        return InsufficientFunds("the balance does not cover this deposit", balance=int(result[1]))
    return BY_REASON[reason](_MESSAGES.get(reason, reason))


_MESSAGES = {
    "unknown_payer": "this payer key is not registered with the ledger",
    "payer_suspended": "this payer is suspended",
    "unknown_channel": "this payer has no such channel with this gateway",
    "channel_closed": "this channel is closed or expired; pay directly or open another",
    "invoice_mismatch": "this channel holds another asset",
    "stale_voucher": "the voucher's sequence is not above the channel's last (replay?)",
    "underpaid_voucher": "the voucher raises the cumulative amount by less than the price",
    "insufficient_funds": "the voucher goes beyond the channel's deposit",
}
