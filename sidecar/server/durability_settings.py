"""The `durability` settings group (docs/configuration.md): how money paid in on chain is
made durable in the ledger, and how often worker 0 reconciles the ledger with the chain."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sidecar.core.errors import ConfigError

_BOUNDS = {
    "replicas": (0, 16),
    "timeout_ms": (1, 60_000),
    "reconcile_interval_seconds": (0, 7 * 86400),
    "reconcile_blocks": (1, 1_000_000),
}
_MONEY_IN = ("durable", "off")


@dataclass(frozen=True)
class Durability:
    # "durable": a top-up's credit and an `exact` settlement's record are acknowledged once
    # on disk (WAITAOF, or appendfsync always); "off": as soon as Redis applied them.
    money_in: str = "durable"
    replicas: int = 0  # WAITAOF numreplicas: replicas that must have fsynced it too
    timeout_ms: int = 1000  # WAITAOF's wait; past it the top-up answers 503 credit_not_durable
    # Worker 0 runs `x402 reconcile` over the last `reconcile_blocks` blocks at start and
    # then this often (needs chain_rpc_url and an `onchain` token); 0: never.
    reconcile_interval_seconds: int = 300
    reconcile_blocks: int = 2000

    @property
    def enabled(self) -> bool:
        return self.money_in == "durable"

    @classmethod
    def from_mapping(cls, raw: Any) -> Durability:
        """Checked `durability` config; a bad value raises ConfigError naming the key."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError("config durability: must be a mapping")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"config durability: unknown key {key!r}")
            if key == "money_in":
                if value not in _MONEY_IN:
                    raise ConfigError("config durability.money_in: must be durable or off")
            else:
                low, high = _BOUNDS[key]
                if type(value) is not int or not low <= value <= high:
                    raise ConfigError(f"config durability.{key}: must be an integer {low}..{high}")
            values[key] = value
        return cls(**values)
