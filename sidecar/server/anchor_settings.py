"""The sidecar config's `anchor_chain` mapping: where settlement batches are anchored on
chain (ledger/anchors.py, docs/configuration.md). Empty: no chain anchor."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from sidecar.core.errors import ConfigError

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class AnchorChain:
    rpc_url: str  # the chain's JSON-RPC (http or https)
    contract: str  # the BatchAnchor's address (x402 anchor deploy)
    key_file: str  # the operator's hex private key, mode 0600: the contract's operator
    timeout_seconds: int = 60  # an anchor transaction must be mined within it

    @classmethod
    def from_mapping(cls, raw: Any) -> AnchorChain | None:
        """Checked `anchor_chain` config; None when empty. A bad value raises ConfigError
        naming `anchor_chain.<key>`, never the URL (it may hold a provider's API key)."""
        if not raw:
            return None
        if not isinstance(raw, Mapping):
            raise ConfigError("config anchor_chain: must be a mapping")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"config anchor_chain: unknown key {key!r}")
        for key in ("rpc_url", "contract", "key_file"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ConfigError(f"config anchor_chain.{key}: required (a string)")
        if urlsplit(raw["rpc_url"]).scheme not in ("http", "https"):
            raise ConfigError("config anchor_chain.rpc_url: must be an http(s) URL")
        if not ADDRESS.fullmatch(raw["contract"]):
            raise ConfigError("config anchor_chain.contract: must be a 0x-prefixed EVM address")
        timeout = raw.get("timeout_seconds", 60)
        if type(timeout) is not int or not 1 <= timeout <= 3600:
            raise ConfigError("config anchor_chain.timeout_seconds: must be an integer 1..3600")
        return cls(raw["rpc_url"], raw["contract"], raw["key_file"], timeout)
