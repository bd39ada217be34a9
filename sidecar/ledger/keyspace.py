"""Every Redis key the ledger uses, in one place.

All of one payer's keys carry the payer as hash tag, so every script touches a single
slot and runs unchanged on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "x402"
PAYERS = f"{PREFIX}:payers"  # set of registered payers; never touched by a money script


def account(payer: str) -> str:
    """Hash: status, balance:<asset>, credited:<asset>, debited:<asset>, held:<asset>
    (atomic units; held: in open holds, out of balance)."""
    return f"{PREFIX}:{{{payer}}}:account"


def nonce(payer: str, nonce_value: str) -> str:
    """Marks a spent nonce until its proof has expired; holds the receipt id."""
    return f"{PREFIX}:{{{payer}}}:nonce:{nonce_value}"


def outcome(payer: str, identity: str) -> str:
    """Hash: a payment's first outcome (fingerprint of the request it paid for, receipt id,
    balance, redeliveries), kept as long as its proof's nonce (core/retries.py)."""
    return f"{PREFIX}:{{{payer}}}:paid:{identity}"


def replays(payer: str) -> str:
    """Zset: the outcome keys holding a kept response (server/replays.py), by expiry (unix
    ms): a payer keeps at most `replay_per_payer` at once."""
    return f"{PREFIX}:{{{payer}}}:replays"


def holds(payer: str) -> str:
    """Hash: hold id → the hold (JSON: asset, held, nonce, receipt facts), until captured,
    released or swept (ledger/holds.py)."""
    return f"{PREFIX}:{{{payer}}}:holds"


def hold_expiries(payer: str) -> str:
    """Sorted set: hold id by expiry (unix ms, Redis's clock); the sweep reads it."""
    return f"{PREFIX}:{{{payer}}}:hold-expiries"


def receipts(payer: str) -> str:
    """Stream of the payer's receipts, one entry per debit."""
    return f"{PREFIX}:{{{payer}}}:receipts"


def credits(payer: str) -> str:
    """Stream of the payer's credits, one entry per applied top-up."""
    return f"{PREFIX}:{{{payer}}}:credits"


def idempotency(payer: str, key: str) -> str:
    """Remembers an applied credit so a retried top-up is not applied twice."""
    return f"{PREFIX}:{{{payer}}}:credit:{key}"


# -- settlement (sidecar/settlement.py) ---------------------------------------------------

BATCHES = f"{PREFIX}:batches"  # sorted set: batch id by closed_at, the anchor index
SETTLEMENT = f"{PREFIX}:settlement"  # hash: the last settle pass (for the lag metric)


def settlement(payer: str) -> str:
    """Hash: `settled` (last stream id in a committed batch), `seq`, and the open claim."""
    return f"{PREFIX}:{{{payer}}}:settlement"


def payer_batches(payer: str) -> str:
    """List of the payer's committed batch ids, in order (index = seq - 1)."""
    return f"{PREFIX}:{{{payer}}}:batches"


def batch(batch_id: str) -> str:
    """String: a signed batch manifest (JSON), written by the Redis anchor sink."""
    return f"{PREFIX}:batch:{batch_id}"


# -- state channels (sidecar/channel.py) --------------------------------------------------


def channel(payer: str, channel_id: str) -> str:
    """Hash: status, asset, deposit, cumulative, sequence, payee, expiry, last voucher."""
    return f"{PREFIX}:{{{payer}}}:channel:{channel_id}"


def channels(payer: str) -> str:
    """Set of the payer's open channel ids (the settle pass closes expired ones)."""
    return f"{PREFIX}:{{{payer}}}:channels"


# -- rate limits (sidecar/ratelimit.py) ---------------------------------------------------


def payer_rate(payer: str) -> str:
    """String: the payer's rate-limit bucket (GCRA arrival time, µs); expires when full."""
    return f"{PREFIX}:{{{payer}}}:rate"


def ip_rate(address: str) -> str:
    """String: a client address's rate-limit bucket. Its own hash tag: one slot per address."""
    return f"{PREFIX}:ip:{{{address}}}"


# -- the x402 `exact` scheme (sidecar/ledger/authorizations.py) ---------------------------


def authorization(authorizer: str, key: str) -> str:
    """String: one EIP-3009 authorization's state, `reserved:<id>` then `settled:<tx>`,
    until its validBefore (+ grace). Tagged by the authorizer (an EVM address), so the
    reservation is one key in one slot; `key` is network:token:nonce."""
    return f"{PREFIX}:{{evm:{authorizer.lower()}}}:auth:{key}"


# -- the operator's dashboard (sidecar/ledger/decisions.py) -------------------------------

DECISIONS = f"{PREFIX}:decisions"  # stream of recent decision lines, capped (MAXLEN ~)
