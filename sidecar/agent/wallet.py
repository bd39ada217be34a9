"""An agent's wallet: its Ed25519 identity, its spending guards and its budget accounting.

One wallet works against every x402 gateway (the key is the payer id everywhere). Guards
are checked, and the amount reserved, before anything is signed; a payment the gateway
refuses gives its reservation back. All amounts are compared as integers: every decimal
string is scaled to `SCALE` decimals, enough for any asset the sidecar accepts (0..18).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


class Wallet:
    """Identity + guards + budget accounting; safe to share across threads and tasks.

    `max_amount` (per request) and `budget` (in total, per asset) are decimal strings in
    the units of the asset paid; `assets` and `payees` are allow-lists.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        max_amount: str | None = None,
        budget: str | None = None,
        assets: Iterable[str] | None = None,
        payees: Iterable[str] | None = None,
    ) -> None:
        self.identity = identity
        self.guards = Guards.parse(max_amount, budget, assets, payees)
        self._lock = threading.Lock()
        self._spent: dict[str, int] = {}
        self._reserved: dict[str, int] = {}

    def __repr__(self) -> str:  # never the key
        return f"Wallet(payer={self.public_key!r}, guards={self.guards!r})"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def generate(cls, **guards: Any) -> Wallet:
        return cls(Identity.generate(), **guards)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **guards: Any) -> Wallet:
        """A key file written by `x402 keygen`."""
        return cls(Identity.load(path), **guards)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **guards: Any) -> Wallet:
        """X402_WALLET (the key text) or X402_WALLET_FILE (a key file from `x402 keygen`)."""
        env = os.environ if env is None else env
        if env.get(ENV_SEED):
            return cls(Identity.from_seed_text(env[ENV_SEED], source=ENV_SEED), **guards)
        if env.get(ENV_FILE):
            return cls.from_file(env[ENV_FILE], **guards)
        raise ConfigError(
            f"no wallet: set {ENV_SEED} or {ENV_FILE} (create a key: x402 keygen --out agent.key)"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **guards: Any) -> Wallet:
        """From `path` if given, else from the environment (the CLI's --wallet rule)."""
        return cls.from_file(path, **guards) if path else cls.from_env(**guards)

    # -- identity --------------------------------------------------------------------------
    @property
    def public_key(self) -> str:
        """The payer id: register it with a gateway's ledger (x402 payer register)."""
        return self.identity.public_key

    def sign(self, terms: Mapping[str, Any]) -> dict[str, Any]:
        return protocol.sign_proof(terms, self.identity)

    # -- accounting ------------------------------------------------------------------------
    def reserve(self, asset: str, amount: str, payee: str) -> Reservation:
        """Check every guard and set the amount aside, atomically; raises a GuardRefused."""
        value = scaled(amount)
        guards = self.guards
        if guards.assets is not None and asset not in guards.assets:
            allowed = ", ".join(sorted(guards.assets))
            raise AssetNotAllowed(f"guard assets: {asset} is not an allowed asset ({allowed})")
        if guards.payees is not None and payee not in guards.payees:
            raise PayeeNotAllowed(f"guard payees: {payee} is not an allowed payee")
        if guards.max_amount is not None and value > guards.max_amount:
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
