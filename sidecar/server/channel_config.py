"""The `channels` settings group: self-serve channels, opened and closed by the agents
themselves on the side port (POST /x402/channel/open and /close, docs/protocol.md §9).

    channels:
      self_serve: true       # false: only the operator opens channels
      asset: ""              # "": the default asset
      min_deposit: "0.01"    # a deposit's bounds, in the asset's decimals
      max_deposit: "1000"
      max_ttl_seconds: 86400 # the longest lifetime an agent may ask for

Parsed and checked here (ConfigError naming `channels.<key>`); config.py only holds the
raw mapping and asks for `ChannelTerms.from_mapping` at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import AmountError, ConfigError
from sidecar.core.money import MAX_BALANCE, Asset
from sidecar.server.envoy.contract import CHANNEL_CLOSE_PATH, CHANNEL_OPEN_PATH

DEFAULTS: dict[str, Any] = {
    "self_serve": True,
    "asset": "",
    "min_deposit": "0.01",
    "max_deposit": "1000",
    "max_ttl_seconds": 86400,
}
MAX_TTL_SECONDS = 366 * 86400


@dataclass(frozen=True)
class ChannelTerms:
    """Self-serve channels as configured: the asset and bounds (atomic units)."""

    asset: Asset
    min_deposit: int
    max_deposit: int
    max_ttl_seconds: int

    @classmethod
    def from_mapping(
        cls, raw: Any, assets: Mapping[str, Asset], default_asset: str
    ) -> ChannelTerms | None:
        """The checked group; None when self-serve channels are off."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("config channels: must be a mapping")
        unknown = set(raw) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"config channels: unknown key {sorted(unknown)[0]!r}")
        spec = {**DEFAULTS, **raw}
        if not isinstance(spec["self_serve"], bool):
            raise ConfigError("config channels.self_serve: must be true or false")
        if not spec["self_serve"]:
            return None
        code = str(spec["asset"] or default_asset)
        asset = assets.get(code)
        if asset is None:
            raise ConfigError(f"config channels.asset: {code!r} is not in assets")
        low, high = (_amount(asset, key, spec[key]) for key in ("min_deposit", "max_deposit"))
        if not 0 < low <= high <= MAX_BALANCE:
            raise ConfigError("config channels: need 0 < min_deposit <= max_deposit")
        ttl = spec["max_ttl_seconds"]
        if type(ttl) is not int or not 1 <= ttl <= MAX_TTL_SECONDS:
            raise ConfigError(f"config channels.max_ttl_seconds: an integer 1..{MAX_TTL_SECONDS}")
        return cls(asset, low, high, ttl)

    def discovery(self) -> dict[str, Any]:
        """Discovery's `channels` entry: where and within which bounds agents open."""
        return {
            "open": {"method": "POST", "path": CHANNEL_OPEN_PATH},
            "close": {"method": "POST", "path": CHANNEL_CLOSE_PATH},
            "asset": self.asset.code,
            "min_deposit": self.asset.to_decimal(self.min_deposit),
            "max_deposit": self.asset.to_decimal(self.max_deposit),
            "max_ttl_seconds": self.max_ttl_seconds,
        }


def _amount(asset: Asset, key: str, value: Any) -> int:
    if not isinstance(value, str):
        raise ConfigError(f'config channels.{key}: write the amount as a string, like "10"')
    try:
        return asset.to_atomic(value)
    except AmountError as exc:
        raise ConfigError(f"config channels.{key}: {exc}") from None
