"""Money: decimal strings on the wire, integer atomic units everywhere else. No floats."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar.core.errors import AmountError

_DECIMAL = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]+))?")
# Far beyond any real balance; bounds the work a hostile amount string can cause.
MAX_DIGITS = 36
# The ledger's Lua compares doubles, exact up to 2^53: no balance or price may pass it.
MAX_BALANCE = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Asset:
    code: str
    decimals: int

    def to_atomic(self, amount: str) -> int:
        """Parse a human decimal string ("0.25") into atomic units (250000 for 6 decimals)."""
        return to_atomic(amount, self.decimals)

    def to_decimal(self, atomic: int) -> str:
        return to_decimal(atomic, self.decimals)


def to_atomic(amount: str, decimals: int) -> int:
    if not isinstance(amount, str):
        raise AmountError(f"amount must be a decimal string, not {type(amount).__name__}")
    if len(amount) > MAX_DIGITS + 1:
        raise AmountError("amount has too many digits")
    match = _DECIMAL.fullmatch(amount)
    if match is None:
        raise AmountError(f"amount {amount!r} is not a non-negative decimal like '0.25'")
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > decimals:
        raise AmountError(f"amount {amount!r} has more than {decimals} decimals")
    scaled: int = int(whole) * 10**decimals + int(fraction.ljust(decimals, "0") or "0")
    return scaled


def to_decimal(atomic: int, decimals: int) -> str:
    """Shortest exact decimal string: 250000 at 6 decimals is "0.25", 1000000 is "1"."""
    sign = "-" if atomic < 0 else ""
    whole, fraction = divmod(abs(atomic), 10**decimals)
    digits = str(fraction).rjust(decimals, "0").rstrip("0") if decimals else ""
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"
