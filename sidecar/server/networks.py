"""Network presets of the `onchain` config: `network: base-sepolia` fills the token, its
decimals and its EIP-712 domain from the official `x402` package's own table
(`x402.mechanisms.evm`: DEFAULT_ASSETS by CAIP-2 id, V1_NETWORK_CHAIN_IDS for the names),
read at config time, never copied here. An explicit key of the entry still wins.

Only the networks whose default token pays by EIP-3009 (`transferWithAuthorization`, the
`exact` scheme the gateway settles) are presets; a token that pays through Permit2 is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from sidecar.core.errors import ConfigError
from sidecar.core.exact import ADDRESS, EVM_NETWORK

EIP3009 = "eip3009"


@cache
def _tables() -> tuple[dict[str, list[Any]], dict[str, int]]:
    try:
        from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
        from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
    except ImportError:  # pragma: no cover - the server extra installs x402[evm]
        raise ConfigError(
            "config onchain: network presets need the official x402 package "
            "(pip install 'x402-sidecar[server]')"
        ) from None
    return dict(DEFAULT_ASSETS), dict(V1_NETWORK_CHAIN_IDS)


def default_token(caip2: str) -> Mapping[str, Any] | None:
    """The official package's default stablecoin on `caip2`, if it pays by EIP-3009."""
    assets = _tables()[0].get(caip2) or []
    if not assets:
        return None
    first: Mapping[str, Any] = assets[0]
    return first if first.get("asset_transfer_method", EIP3009) == EIP3009 else None


@cache
def presets() -> dict[str, str]:
    """Preset name → CAIP-2 id: every named EVM network the official package has an
    EIP-3009 default token for (base, base-sepolia, polygon, …)."""
    _, chain_ids = _tables()
    named = {name: f"eip155:{chain_id}" for name, chain_id in chain_ids.items()}
    return {name: caip2 for name, caip2 in sorted(named.items()) if default_token(caip2)}


def caip2_of(key: str, network: Any) -> str:
    """A preset name or an `eip155:<chain id>`, as CAIP-2; an unknown name is a
    ConfigError listing the known ones."""
    if isinstance(network, str) and EVM_NETWORK.fullmatch(network):
        return network
    found = presets().get(str(network).lower()) if isinstance(network, str) else None
    if found is None:
        raise ConfigError(
            f"{key}.network: {network!r} is not a known network; one of "
            f"{', '.join(presets())}, or eip155:<chain id>"
        )
    return found


def resolve(code: str, spec: Any) -> Any:
    """One `onchain.<code>` entry with its network's preset filled in: `network` as CAIP-2,
    and the official default token's address, name, version and decimals where the entry
    gives no token of its own (or gives that very token). Other entries pass unchanged,
    for `core.exact.onchain_from_config` to check."""
    key = f"config onchain.{code}"
    if not isinstance(spec, Mapping) or "network" not in spec:
        return spec
    filled = {**spec, "network": caip2_of(key, spec["network"])}
    default = default_token(filled["network"])
    token = spec.get("token")
    if token is None and default is None:
        raise ConfigError(
            f"{key}.token: required; the official x402 package has no EIP-3009 token "
            f"for {filled['network']}"
        )
    if default is None or (token is not None and str(token).lower() != default["asset"].lower()):
        return filled  # an explicit token of its own: its domain is the entry's to give
    preset = {
        "token": default["asset"],
        "name": default["name"],
        "version": default["version"],
        "decimals": default["decimals"],
    }
    return {**preset, **filled}


def check_address(key: str, address: str) -> str:
    """A 0x address; in mixed case it must carry its EIP-55 checksum (a typo in a
    checksummed address is caught here, not by a payment that goes nowhere)."""
    if ADDRESS.fullmatch(address) is None:
        raise ConfigError(f"{key}: a 0x-prefixed 20-byte address")
    digits = address[2:]
    if digits != digits.lower() and digits != digits.upper():
        from eth_utils.address import to_checksum_address

        if to_checksum_address(address) != address:
            raise ConfigError(f"{key}: {address} fails its EIP-55 checksum (a typo?)")
    return address
