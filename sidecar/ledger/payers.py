"""Payers as an operator manages them: register, credit, suspend, activate, read balances.

The one service behind both the admin API (server/admin.py) and the CLI's local path
(`x402 payer …` against Redis); the CLI's `--admin` path speaks the same shapes over gRPC
(tools/admin_client.py). Amounts come in and go out as wire decimals of their asset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.core.errors import ConfigError, InvalidKey, UnknownAsset, X402Error
from sidecar.core.identity import verify_key
from sidecar.core.money import Asset
from sidecar.ledger.accounts import ACTIVE, SUSPENDED, Ledger
from sidecar.ledger.channels import DEFAULT_TTL, Channels, ChannelState


@dataclass(frozen=True, slots=True)
class Registered:
    created: bool  # False: it was registered already
    status: str


@dataclass(frozen=True, slots=True)
class Credited:
    applied: bool  # False: the idempotency key was seen, nothing credited again
    asset: str
    balance: str


@dataclass(frozen=True, slots=True)
class AssetBalance:
    asset: str
    balance: str
    channeled: str  # locked in open channels, not in `balance`
    credited: str
    debited: str


@dataclass(frozen=True, slots=True)
class Balance:
    payer: str
    status: str
    assets: tuple[AssetBalance, ...]


@dataclass(frozen=True, slots=True)
class ChannelView:
    channel_id: str
    payer: str
    payee: str
    asset: str
    deposit: str
    cumulative: str
    sequence: int
    status: str
    opened_at: int
    expires_at: int
    balance: str = ""  # the payer's balance left after opening; "" when not known


@dataclass(frozen=True, slots=True)
class ChannelClosing:
    channel_id: str
    asset: str
    cumulative: str
    refund: str
    balance: str  # the payer's balance after the refund
    vouchers: int  # how many vouchers the channel accepted
    receipt_id: str
    already: bool  # it had been closed before; nothing moved now


def checked_key(payer: str) -> str:
    """The payer key as given, or InvalidKey."""
    try:
        verify_key(payer)
    except (ValueError, UnicodeEncodeError):
        raise InvalidKey(
            "not a public key: expected base64url of a 32-byte Ed25519 key (see x402 keygen)"
        ) from None
    return payer


class Payers:
    def __init__(
        self,
        ledger: Ledger,
        assets: Mapping[str, Asset],
        default_asset: str,
        payee: str | None = None,  # the gateway's key id: channels are opened to it
    ) -> None:
        self.ledger, self.assets, self.default_asset = ledger, assets, default_asset
        self.payee = payee
        self.channels = Channels(ledger)

    def asset(self, code: str | None) -> Asset:
        """The asset named (the default one for None or ""), or UnknownAsset."""
        asset = self.assets.get(code or self.default_asset)
        if asset is None:
            raise UnknownAsset(f"unknown asset {code!r} (known: {', '.join(self.assets)})")
        return asset

    def show(self, code: str, atomic: int) -> str:
        asset = self.assets.get(code)
        return asset.to_decimal(atomic) if asset else str(atomic)

    async def register(self, payer: str) -> Registered:
        created = await self.ledger.register(checked_key(payer))
        account = await self.ledger.account(payer)
        return Registered(created, account.status)

    async def suspend(self, payer: str) -> str:
        await self.ledger.set_status(checked_key(payer), SUSPENDED)
        return SUSPENDED

    async def activate(self, payer: str) -> str:
        await self.ledger.set_status(checked_key(payer), ACTIVE)
        return ACTIVE

    async def credit(
        self, payer: str, amount: str, asset_code: str | None, idempotency_key: str
    ) -> Credited:
        """Add `amount` (a wire decimal) once per idempotency key."""
        if not idempotency_key:
            raise X402Error("an idempotency key is required (a retry must not credit twice)")
        asset = self.asset(asset_code)
        atomic = asset.to_atomic(amount)
        result = await self.ledger.credit(checked_key(payer), asset.code, atomic, idempotency_key)
        return Credited(result.applied, asset.code, asset.to_decimal(result.balance))

    async def balance(self, payer: str) -> Balance:
        account = await self.ledger.account(checked_key(payer))
        codes = set(self.assets) | set(account.balances) | set(account.channeled)
        return Balance(
            payer,
            account.status,
            tuple(
                AssetBalance(
                    code,
                    self.show(code, account.balances.get(code, 0)),
                    self.show(code, account.channeled.get(code, 0)),
                    self.show(code, account.credited.get(code, 0)),
                    self.show(code, account.debited.get(code, 0)),
                )
                for code in sorted(codes)
            ),
        )

    async def open_channel(
        self,
        payer: str,
        deposit: str,
        asset_code: str | None,
        ttl: int = DEFAULT_TTL,
        channel_id: str | None = None,
    ) -> ChannelView:
        """Lock `deposit` of the payer's balance into a channel to this gateway."""
        if self.payee is None:
            raise ConfigError("config signing_key_file: channels are opened to the gateway's key")
        asset = self.asset(asset_code)
        opened, balance = await self.channels.open(
            checked_key(payer), asset.code, asset.to_atomic(deposit), self.payee, ttl, channel_id
        )
        state = await self.channels.get(payer, opened)
        return self._view(state, asset.to_decimal(balance))

    async def channel(self, payer: str, channel_id: str) -> ChannelView:
        return self._view(await self.channels.get(checked_key(payer), channel_id))

    async def close_channel(self, payer: str, channel_id: str) -> ChannelClosing:
        """Refund what is left of the deposit; closing twice moves nothing (`already`)."""
        state = await self.channels.get(checked_key(payer), channel_id)
        closed = await self.channels.close(payer, channel_id)
        assert closed is not None  # not only_expired: it always closes

        def show(atomic: int) -> str:
            return self.show(state.asset, atomic)

        return ChannelClosing(
            closed.channel_id,
            state.asset,
            show(closed.cumulative),
            show(closed.refund),
            show(closed.balance),
            closed.vouchers,
            closed.receipt_id,
            closed.already,
        )

    def _view(self, state: ChannelState, balance: str = "") -> ChannelView:
        return ChannelView(
            state.channel_id,
            state.payer,
            state.payee,
            state.asset,
            self.show(state.asset, state.deposit),
            self.show(state.asset, state.cumulative),
            state.sequence,
            state.status,
            state.opened_at,
            state.expires_at,
            balance,
        )
