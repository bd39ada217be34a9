"""Every Lua script of the ledger, in one place: the `.lua` files beside this module
(package data, as `limits` ships its scripts), each loaded once at import.

Every money script starts with the same checks (deadline, payer, nonce, balance): they are
written once, in `lua/money.lua`, and prepended to each money script's source here, so a
call is still one EVALSHA of one script. The hold scripts also share `lua/holds_common.lua`.

The hot-path scripts go through the pipelined client as `Script`s (EVALSHA, reloaded on
NOSCRIPT); the others through redis-py's `register_script`, from their sources.
"""

from __future__ import annotations

from importlib.resources import files

from sidecar.ledger.pipe import Script


def source(name: str) -> str:
    """The text of `lua/<name>.lua`."""
    return files(__package__ or "sidecar.ledger").joinpath(f"lua/{name}.lua").read_text("utf-8")


_MONEY = source("money")
_HOLDS_COMMON = source("holds_common")


def money(name: str, *shared: str) -> str:
    """A money script's source: the shared checks, then `shared` preludes, then its own."""
    return "".join((_MONEY, *shared, source(name)))


# The hot path: one per paid check.
DEBIT = Script(money("debit"))
VOUCHER = Script(money("channel_voucher"))
RATE = Script(source("rate_limit"))
# Off the hot path but beside it: one call per decision-log batch (ledger/decisions.py).
DECISIONS = Script(source("decisions"))

# Holds (ledger/holds.py).
HOLD = Script(money("hold", _HOLDS_COMMON))
HOLD_CLOSE = Script(money("hold_close", _HOLDS_COMMON))
HOLD_SWEEP_SOURCE = money("hold_sweep", _HOLDS_COMMON)
# Channels (ledger/channels.py) and `exact` reservations (ledger/authorizations.py).
CHANNEL_OPEN_SOURCE = money("channel_open")
CHANNEL_CLOSE_SOURCE = money("channel_close")
EXACT_RESERVE_SOURCE = money("exact_reserve")
EXACT_FINISH_SOURCE = money("exact_finish")
