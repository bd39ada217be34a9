"""Network presets of the `onchain` config (server/networks.py), compared against the official
x402 package's own table, and the address checks of `pay_to` and `token`."""

from __future__ import annotations

from typing import Any

import pytest
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS

from sidecar.core.errors import ConfigError
from sidecar.server import networks
from sidecar.server.config import Settings

OPERATOR = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
OWN_TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def terms(entry: dict[str, Any], **more: Any) -> Any:
    raw = {
        "onchain": {"USDF": entry},
        "pay_to": OPERATOR,
        "facilitator_url": "https://x402.org/facilitator",
        **more,
    }
    found = Settings.from_mapping(raw, {}).exact_terms()
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("name", "caip2"), [("base", "eip155:8453"), ("base-sepolia", "eip155:84532")]
)
def test_a_preset_fills_the_token_from_the_official_table(name: str, caip2: str) -> None:
    official = DEFAULT_ASSETS[caip2][0]
    usdf = terms({"network": name}).assets["USDF"]
    assert (usdf.network, usdf.token, usdf.decimals) == (caip2, official["asset"], 6)
    assert (usdf.name, usdf.version) == (official["name"], official["version"])


def test_every_named_eip3009_network_of_the_official_package_is_a_preset() -> None:
    expected = {
        name
        for name, chain_id in V1_NETWORK_CHAIN_IDS.items()
        if (assets := DEFAULT_ASSETS.get(f"eip155:{chain_id}"))
        and assets[0].get("asset_transfer_method", "eip3009") == "eip3009"
    }
    assert set(networks.presets()) == expected
    assert {"base", "base-sepolia", "polygon", "avalanche"} <= expected
    assert "megaeth" not in expected  # its token pays through Permit2, not EIP-3009


def test_a_caip2_network_of_the_table_is_filled_too() -> None:
    arbitrum = DEFAULT_ASSETS["eip155:42161"][0]
    assert terms({"network": "eip155:42161"}).assets["USDF"].token == arbitrum["asset"]


def test_an_explicit_token_still_wins() -> None:
    entry = {"network": "base-sepolia", "token": OWN_TOKEN, "name": "Mine", "version": "7"}
    usdf = terms(entry).assets["USDF"]
    assert (usdf.network, usdf.token, usdf.name, usdf.version) == (
        "eip155:84532",
        OWN_TOKEN,
        "Mine",
        "7",
    )
    with pytest.raises(ConfigError, match=r"config onchain\.USDF\.name"):
        terms({"network": "base-sepolia", "token": OWN_TOKEN})  # its domain is unknown
    named = terms({"network": "base", "name": "Renamed"}).assets["USDF"]
    assert (named.name, named.version) == ("Renamed", DEFAULT_ASSETS["eip155:8453"][0]["version"])


def test_an_unknown_network_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"config onchain\.USDF\.network") as error:
        terms({"network": "base-sepolia-typo"})
    assert "base, base-sepolia" in str(error.value) and "eip155:<chain id>" in str(error.value)


def test_a_chain_without_a_default_token_needs_one() -> None:
    with pytest.raises(ConfigError, match=r"onchain\.USDF\.token: required"):
        terms({"network": "eip155:31337", "name": "USD Coin", "version": "2"})


def test_a_preset_of_other_decimals_than_the_ledger_asset_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"onchain\.USDF\.decimals"):
        terms({"network": "base"}, assets={"USDF": 2})


@pytest.mark.parametrize("key", ["pay_to", "token"])
def test_a_mixed_case_address_must_carry_its_checksum(key: str) -> None:
    broken = OPERATOR.replace("F79", "f79")  # one letter's case flipped
    entry = {"network": "eip155:31337", "token": OWN_TOKEN, "name": "USD Coin", "version": "2"}
    if key == "pay_to":
        with pytest.raises(ConfigError, match=r"config pay_to: .* EIP-55 checksum"):
            terms(entry, pay_to=broken)
        assert terms(entry, pay_to=OPERATOR.lower()).pay_to == OPERATOR.lower()  # no checksum
    else:
        with pytest.raises(ConfigError, match=r"config onchain\.USDF\.token: .* EIP-55"):
            terms({**entry, "token": broken})
    with pytest.raises(ConfigError, match="config pay_to"):
        terms(entry, pay_to="0x1234")
