"""Config: one YAML file, env overrides, and errors that name the key but never a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.core.errors import ConfigError
from sidecar.core.identity import Identity, write_secret
from sidecar.server.config import Edge, Settings

ROUTE = {"method": "GET", "path": "/api/{id}", "price": "0.25"}


def load(raw: dict[str, Any], **env: str) -> Settings:
    return Settings.from_mapping(raw, env)


def test_defaults_and_env_overrides() -> None:
    settings = load(
        {"redis_url": "redis://file:6379/0", "workers": 2},
        X402_REDIS_URL="redis://env:6379/1",
        X402_WORKERS="4",
        X402_LOG_LEVEL="DEBUG",
    )
    assert settings.redis_url == "redis://env:6379/1"
    assert settings.workers == 4
    assert settings.log_level == "debug"
    assert settings.max_proof_bytes == 4096


def test_routes_become_a_route_table() -> None:
    table = load(
        {"routes": {"item": ROUTE, "free": {**ROUTE, "path": "/f", "price": 0}}}
    ).route_table()
    price = table.lookup("GET", "/api/7")
    assert price is not None and (price.route, price.amount) == ("item", 250_000)
    assert table.lookup("GET", "/f") is not None  # listed at zero: still a listed route


@pytest.mark.parametrize(
    ("raw", "env", "key"),
    [
        ({"colour": "red"}, {}, "'colour'"),
        ({"workers": "many"}, {}, "workers"),
        ({"workers": 0}, {}, "workers"),
        ({}, {"X402_MAX_PROOF_BYTES": "-5"}, "max_proof_bytes"),
        ({"log_level": "loud"}, {}, "log_level"),
        ({"routes": {"r": {**ROUTE, "price": 0.25}}}, {}, "routes.r.price"),  # a float
        ({"routes": {"r": {**ROUTE, "price": "0.0000001"}}}, {}, "routes.r.price"),
        ({"routes": {"r": {**ROUTE, "price": "-1"}}}, {}, "routes.r.price"),
        ({"routes": {"r": {**ROUTE, "method": "FETCH"}}}, {}, "routes.r.method"),
        ({"routes": {"r": {**ROUTE, "path": "api"}}}, {}, "routes.r.path"),
        ({"routes": {"r": {**ROUTE, "asset": "BTC"}}}, {}, "routes.r.asset"),
        ({"routes": {"r": {**ROUTE, "cost": "1"}}}, {}, "routes.r"),
        ({"routes": {"r": "0.25"}}, {}, "routes.r"),
        ({"assets": {"USDF": 40}}, {}, "assets.USDF"),
        ({"default_asset": "EURF"}, {}, "default_asset"),
        ({"routes": ["r"]}, {}, "routes"),
        ({"edge": "strict"}, {}, "edge"),
        ({"edge": {"colour": 1}}, {}, "edge: unknown key 'colour'"),
        ({"edge": {"xff_num_trusted_hops": -1}}, {}, "edge.xff_num_trusted_hops"),
        ({"edge": {"trust_request_id": "yes"}}, {}, "edge.trust_request_id"),
        ({"edge": {"strip_method_override": 1}}, {}, "edge.strip_method_override"),
        ({"edge": {"request_headers_timeout_seconds": 1.5}}, {}, "edge.request_headers_"),
        ({"edge": {"max_request_headers_kb": 9000}}, {}, "edge.max_request_headers_kb"),
        ({"edge": {"http2_max_concurrent_streams": 0}}, {}, "edge.http2_max_concurrent"),
        ({"edge": {"max_connections": True}}, {}, "edge.max_connections"),
    ],
)
def test_bad_config_names_the_key(raw: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(raw, **env)


def test_edge_settings_for_envoy() -> None:
    assert load({}).edge_config() == Edge()
    edge = load({"edge": {"xff_num_trusted_hops": 2, "trust_request_id": True}}).edge_config()
    assert (edge.xff_num_trusted_hops, edge.trust_request_id) == (2, True)
    assert edge.request_headers_timeout_seconds == Edge().request_headers_timeout_seconds


def test_assets_take_a_number_or_a_mapping() -> None:
    settings = load({"assets": {"USDF": 6, "EURF": {"decimals": 2}}})
    assert {a.code: a.decimals for a in settings.asset_table().values()} == {"USDF": 6, "EURF": 2}


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Settings.load(bad, env={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text")
    with pytest.raises(ConfigError, match="mapping"):
        Settings.load(scalar, env={})


def test_secrets_load_and_errors_never_echo_them(tmp_path: Path) -> None:
    key_file, secret_file = tmp_path / "signing.key", tmp_path / "invoice.secret"
    identity = Identity.generate()
    identity.save(key_file)
    write_secret(secret_file, "0123456789abcdef0123456789abcdef\n")
    settings = load({"signing_key_file": str(key_file), "invoice_secret_file": str(secret_file)})
    gateway = settings.gateway()
    assert gateway.payee == identity.kid
    assert gateway.invoice_secret == b"0123456789abcdef0123456789abcdef"
    assert "0123456789abcdef" not in repr(gateway) and identity.seed_text not in repr(gateway)

    key_file.write_text("this-is-a-secret-but-not-a-key")
    with pytest.raises(ConfigError) as raised:
        settings.gateway()
    assert "this-is-a-secret" not in str(raised.value)

    secret_file.write_text("short")
    identity_file = tmp_path / "k2"
    Identity.generate().save(identity_file)
    short = load({"signing_key_file": str(identity_file), "invoice_secret_file": str(secret_file)})
    with pytest.raises(ConfigError, match="invoice_secret_file") as raised:
        short.gateway()
    assert "short" not in str(raised.value).replace("invoice_secret_file", "")


def test_missing_secrets_say_how_to_make_them() -> None:
    with pytest.raises(ConfigError, match="x402 keygen"):
        load({}).gateway()
