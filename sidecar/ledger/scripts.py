"""Every Lua script of the ledger, in one place: the `.lua` files beside this module
(package data, as `limits` ships its scripts), each loaded once at import.

The hot-path scripts go through the pipelined client as `Script`s (EVALSHA, reloaded on
NOSCRIPT); the others through redis-py's `register_script`, from `SOURCES`.
"""

from __future__ import annotations

from importlib.resources import files

from sidecar.ledger.pipe import Script


def source(name: str) -> str:
    """The text of `lua/<name>.lua`."""
    return files(__package__ or "sidecar.ledger").joinpath(f"lua/{name}.lua").read_text("utf-8")


# The hot path: one per paid check.
DEBIT = Script(source("debit"))
VOUCHER = Script(source("channel_voucher"))
RATE = Script(source("rate_limit"))
# Off the hot path but beside it: one call per decision-log batch (ledger/decisions.py).
DECISIONS = Script(source("decisions"))

# Holds (ledger/holds.py): the shared release and sweep functions prepended to each.
_HOLDS_COMMON = source("holds_common")
HOLD = Script(_HOLDS_COMMON + source("hold"))
HOLD_CLOSE = Script(_HOLDS_COMMON + source("hold_close"))
HOLD_SWEEP_SOURCE = _HOLDS_COMMON + source("hold_sweep")
