"""An agent's wallet: its keys, its spending guards and its budget accounting.

Keys: an Ed25519 identity (prepaid proofs, channel vouchers; the payer id at every x402
gateway) and/or an EVM key (`sidecar.agent.evm`: the x402 `exact` scheme and top-ups).
Guards are checked, and the amount reserved, before anything is signed; a payment the
gateway refuses gives its reservation back. All amounts are compared as integers: every
amount is scaled to `SCALE` decimals, enough for any asset the sidecar accepts (0..18)
and for ERC-20 tokens (at most 18 decimals here).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.agent.evm import ENV_EVM_KEY, ENV_EVM_KEY_FILE, EvmKey
from sidecar.core import protocol
from sidecar.core.errors import (
    AmountError,
    AssetNotAllowed,
    BudgetExceeded,
    ConfigError,
    MaxAmountExceeded,
    PayeeNotAllowed,
)
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic, to_decimal

SCALE = 18  # the sidecar's config allows assets with 0..18 decimals
ENV_SEED, ENV_FILE = "X402_WALLET", "X402_WALLET_FILE"


def scaled(amount: str, what: str = "amount") -> int:
    """A decimal string as an integer count of 10^-18 units; AmountError if it is not one."""
    try:
        return to_atomic(amount, SCALE)
    except AmountError as exc:
        raise AmountError(f"{what}: {exc}") from None


def unscaled(value: int) -> str:
    return to_decimal(value, SCALE)


def scale_atomic(atomic: int, decimals: int) -> int:
    """`atomic` units of an asset with `decimals` decimals, at the wallet's scale."""
    if type(atomic) is not int or atomic < 0:
        raise AmountError(f"amount must be a non-negative integer of atomic units: {atomic!r}")
    if type(decimals) is not int or not 0 <= decimals <= SCALE:
        raise AmountError(f"an asset has 0..{SCALE} decimals, not {decimals!r}")
    value: int = atomic * 10 ** (SCALE - decimals)
    return value


def _allowed(names: Iterable[str], allowed: frozenset[str]) -> bool:
    """Any of `names` in the allow-list; EVM addresses (0x…) compare case-insensitively."""
    lowered = {name.lower() for name in allowed if name.startswith("0x")}
    return any(
        name in allowed or (name.startswith("0x") and name.lower() in lowered) for name in names
    )


@dataclass(frozen=True)
class Guards:
    """What the agent allows itself. None means "no limit" for that guard."""

    max_amount: int | None = None  # per request, scaled
    budget: int | None = None  # per asset over the wallet object's life, scaled
    assets: frozenset[str] | None = None
    payees: frozenset[str] | None = None

    @classmethod
    def parse(
        cls,
        max_amount: str | None = None,
        budget: str | None = None,
        assets: Iterable[str] | None = None,
        payees: Iterable[str] | None = None,
    ) -> Guards:
        return cls(
            max_amount=None if max_amount is None else scaled(max_amount, "max_amount"),
            budget=None if budget is None else scaled(budget, "budget"),
            # A bare string would become a set of letters; treat it as one name.
            assets=None if assets is None else frozenset(_names(assets)),
            payees=None if payees is None else frozenset(_names(payees)),
        )


def _names(values: Iterable[str]) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


@dataclass
class Reservation:
    """Money set aside for one payment: committed when paid, released when refused."""

    wallet: Wallet
    asset: str
    amount: int  # scaled
    payee: str
    state: str = "reserved"  # → "spent" or "released", once

    @property
    def display(self) -> str:
        return unscaled(self.amount)

    def commit(self, captured: int | None = None) -> None:
        """Paid: the whole reservation, or (a hold captured at the response, metered or
        charged on success) `captured` scaled units of it; the rest goes back to the
        budget."""
        self.wallet._settle(self, spent=True, captured=captured)

    def release(self) -> None:
        self.wallet._settle(self, spent=False)

    def refund(self) -> None:
        """A committed payment that the gateway is now known to have refused: give it back
        (for flows that commit on signing and learn of a refusal later)."""
        self.wallet._refund(self)


class Wallet:
    """Keys + guards + budget accounting; safe to share across threads and tasks.

    `identity`: the Ed25519 key (prepaid and channel payments); `evm`: an EVM key (the
    x402 `exact` scheme, top-ups). Either may be absent, not both. `max_amount` (per
    request) and `budget` (in total, per asset) are decimal strings in the units of the
    asset paid; `assets` and `payees` are allow-lists.
    """

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        evm: EvmKey | None = None,
        max_amount: str | None = None,
        budget: str | None = None,
        assets: Iterable[str] | None = None,
        payees: Iterable[str] | None = None,
    ) -> None:
        if identity is None and evm is None:
            raise ConfigError("a wallet needs a key: an Ed25519 key, an EVM key, or both")
        self._identity = identity
        self.evm = evm
        self.guards = Guards.parse(max_amount, budget, assets, payees)
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}

    def __repr__(self) -> str:  # never a key
        payer = self._identity.public_key if self._identity is not None else None
        evm = f", evm={self.evm!r}" if self.evm is not None else ""
        return f"Wallet(payer={payer!r}{evm}, guards={self.guards!r})"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def generate(cls, *, evm: bool = False, **guards: Any) -> Wallet:
        """A new Ed25519 key (and a new EVM key with evm=True): tests, demos."""
        return cls(Identity.generate(), evm=EvmKey.generate() if evm else None, **guards)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        evm_key_file: str | os.PathLike[str] | None = None,
        **guards: Any,
    ) -> Wallet:
        """A key file written by `x402 keygen` (and an EVM key file, `x402 keygen --evm`)."""
        evm = EvmKey.load(evm_key_file) if evm_key_file else None
        return cls(Identity.load(path), evm=evm, **guards)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **guards: Any) -> Wallet:
        """X402_WALLET (the key text) or X402_WALLET_FILE (a key file from `x402 keygen`),
        and/or X402_EVM_KEY (hex) or X402_EVM_KEY_FILE (`x402 keygen --evm`)."""
        return cls.load(None, env=env, **guards)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        evm_key_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **guards: Any,
    ) -> Wallet:
        """The CLI's --wallet / --evm-key rule: each key from its file if given, else from
        the environment; at least one of the two keys."""
        env = os.environ if env is None else env
        identity = Identity.load(path) if path else _identity_from_env(env)
        evm = EvmKey.load(evm_key_file) if evm_key_file else EvmKey.from_env(env)
        if identity is None and evm is None:
            raise ConfigError(
                f"no wallet: set {ENV_SEED} or {ENV_FILE} (create a key: x402 keygen --out "
                f"agent.key), and/or {ENV_EVM_KEY} or {ENV_EVM_KEY_FILE} for an EVM key"
            )
        return cls(identity, evm=evm, **guards)

    # -- keys ------------------------------------------------------------------------------
    @property
    def identity(self) -> Identity:
        """The Ed25519 key; ConfigError if this wallet holds only an EVM key."""
        if self._identity is None:
            raise ConfigError(
                "this wallet has no Ed25519 key (prepaid and channel payments need one: "
                "x402 keygen --out agent.key)"
            )
        return self._identity

    @property
    def has_identity(self) -> bool:
        return self._identity is not None

    @property
    def public_key(self) -> str:
        """The payer id: register it with a gateway's ledger (x402 payer register)."""
        return self.identity.public_key

    def sign(self, terms: protocol.Invoice | Mapping[str, Any]) -> dict[str, Any]:
        return protocol.sign_proof(terms, self.identity)

    # -- accounting ------------------------------------------------------------------------
    def reserve(self, asset: str, amount: str, payee: str) -> Reservation:
        """Check every guard and set the amount aside, atomically; raises a GuardRefused."""
        return self._reserve(asset, scaled(amount), amount, (asset,), (payee,), payee)

    def reserve_atomic(
        self,
        asset: str,
        atomic: int,
        decimals: int,
        payee: str,
        *,
        aliases: Iterable[str] = (),
        payee_aliases: Iterable[str] = (),
        per_request: bool = True,
    ) -> Reservation:
        """The same for `atomic` units of an asset with `decimals` (an x402 `exact` offer).

        The budget is counted under `asset`; the `assets` allow-list passes if it names
        `asset` or one of `aliases` (e.g. the token's address), the `payees` list if it
        names `payee` or one of `payee_aliases`. per_request=False (a top-up) skips
        max_amount, which caps the price of one request."""
        value = scale_atomic(atomic, decimals)
        display = to_decimal(atomic, decimals)
        return self._reserve(
            asset,
            value,
            display,
            (asset, *aliases),
            (payee, *payee_aliases),
            payee,
            per_request=per_request,
        )

    def _reserve(
        self,
        asset: str,
        value: int,
        amount: str,
        asset_names: tuple[str, ...],
        payee_names: tuple[str, ...],
        payee: str,
        *,
        per_request: bool = True,
    ) -> Reservation:
        guards = self.guards
        if guards.assets is not None and not _allowed(asset_names, guards.assets):
            allowed = ", ".join(sorted(guards.assets))
            raise AssetNotAllowed(f"guard assets: {asset} is not an allowed asset ({allowed})")
        if guards.payees is not None and not _allowed(payee_names, guards.payees):
            raise PayeeNotAllowed(f"guard payees: {payee} is not an allowed payee")
        if per_request and guards.max_amount is not None and value > guards.max_amount:
            raise MaxAmountExceeded(
                f"guard max_amount: {amount} {asset} is more than the "
                f"{unscaled(guards.max_amount)} allowed per request"
            )
        with self._lock:
            committed = self._spent.get(asset, 0) + self._reserved.get(asset, 0)
            if guards.budget is not None and committed + value > guards.budget:
                left = max(guards.budget - committed, 0)
                raise BudgetExceeded(
                    f"guard budget: {amount} {asset} is more than the {unscaled(left)} "
                    f"left of the {unscaled(guards.budget)} {asset} budget"
                )
            self._reserved[asset] = self._reserved.get(asset, 0) + value
        return Reservation(self, asset, value, payee)

    def _settle(
        self, reservation: Reservation, *, spent: bool, captured: int | None = None
    ) -> None:
        with self._lock:
            if reservation.state != "reserved":
                return  # settling twice must not move money twice
            reservation.state = "spent" if spent else "released"
            asset = reservation.asset
            self._reserved[asset] -= reservation.amount
            if spent:
                amount = reservation.amount
                if captured is not None:
                    amount = min(max(captured, 0), amount)
                self._spent[asset] = self._spent.get(asset, 0) + amount

    def _refund(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.state != "spent":
                return
            reservation.state = "released"
            self._spent[reservation.asset] -= reservation.amount

    def spent(self, asset: str = "USDF") -> str:
        """What this wallet object paid in `asset` (decimal string)."""
        with self._lock:
            return unscaled(self._spent.get(asset, 0))

    def remaining(self, asset: str = "USDF") -> str | None:
        """Budget left in `asset`, counting payments in flight; None without a budget."""
        if self.guards.budget is None:
            return None
        with self._lock:
            used = self._spent.get(asset, 0) + self._reserved.get(asset, 0)
        return unscaled(max(self.guards.budget - used, 0))


def _identity_from_env(env: Mapping[str, str]) -> Identity | None:
    if env.get(ENV_SEED):
        return Identity.from_seed_text(env[ENV_SEED], source=ENV_SEED)
    if env.get(ENV_FILE):
        return Identity.load(env[ENV_FILE])
    return None
