"""The `anchor_chain` config: off when empty, every key checked and named when wrong."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core.errors import ConfigError
from sidecar.server.anchor_settings import AnchorChain
from sidecar.server.config import Settings

GOOD = {"rpc_url": "http://127.0.0.1:8545", "contract": "0x" + "1" * 40, "key_file": "k"}


def test_empty_is_off_and_a_good_mapping_is_parsed() -> None:
    assert Settings.from_mapping({}, {}).anchor_chain_config() is None
    parsed = Settings.from_mapping({"anchor_chain": GOOD}, {}).anchor_chain_config()
    assert parsed == AnchorChain(GOOD["rpc_url"], GOOD["contract"], "k", 60)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rpc_url": "ws://x"}, "anchor_chain.rpc_url: must be an http(s) URL"),
        ({"contract": "0x1234"}, "anchor_chain.contract: must be a 0x-prefixed EVM address"),
        ({"key_file": ""}, "anchor_chain.key_file: required"),
        ({"timeout_seconds": 0}, "anchor_chain.timeout_seconds: must be an integer 1..3600"),
        ({"confirmations": 2}, "anchor_chain: unknown key 'confirmations'"),
    ],
)
def test_a_bad_value_is_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_mapping({"anchor_chain": {**GOOD, **change}}, {})


def test_the_url_never_appears_in_an_error() -> None:
    secret = "https://mainnet.example/v2/SECRET-KEY"
    with pytest.raises(ConfigError) as refused:
        Settings.from_mapping({"anchor_chain": {**GOOD, "rpc_url": secret, "contract": "x"}}, {})
    assert "SECRET" not in str(refused.value)
