"""Config: one YAML file, env overrides, and errors that name the key but never a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.core.errors import ConfigError, KeySetError
from sidecar.core.identity import Identity, write_secret
from sidecar.server.config import Settings
from sidecar.server.envoy.edge import Edge
from sidecar.server.replay_settings import ReplaySettings

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
        ({}, {"X402_MAX_PROOF_BYTES": "-5"}, "env X402_MAX_PROOF_BYTES: must be"),
        ({}, {"X402_WORKERS": "0"}, "env X402_WORKERS: must be at least 1"),
        ({}, {"X402_UNLISTED": "allow"}, "env X402_UNLISTED: one of"),
        ({}, {"X402_NETWORK": "ledger"}, "env X402_NETWORK: must be CAIP-2"),
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
        ({"edge": {"cors_origins": "*"}}, {}, "edge.cors_origins"),
        ({"edge": {"cors_origins": ["https://a.example/path"]}}, {}, "edge.cors_origins"),
        ({"edge": {"cors_origins": ["*", "https://a.example"]}}, {}, "edge.cors_origins"),
        ({"redelivery_limit": -1}, {}, "redelivery_limit"),
        ({"redelivery_limit": 101}, {}, "redelivery_limit"),
        ({}, {"X402_REDELIVERY_LIMIT": "1000"}, "X402_REDELIVERY_LIMIT"),
        ({"durability": "always"}, {}, "durability"),
        ({"durability": {"fsync": 1}}, {}, "durability: unknown key 'fsync'"),
        ({"durability": {"money_in": "maybe"}}, {}, "durability.money_in"),
        ({"durability": {"replicas": -1}}, {}, "durability.replicas"),
        ({"durability": {"timeout_ms": 0}}, {}, "durability.timeout_ms"),
        ({"durability": {"reconcile_interval_seconds": "5m"}}, {}, "durability.reconcile_"),
        ({"replay_body_max_bytes": -1}, {}, "replay_body_max_bytes"),
        ({"replay_body_max_bytes": 2 * 1024 * 1024}, {}, "replay_body_max_bytes"),
        ({"replay_per_payer": 10_001}, {}, "replay_per_payer"),
        ({}, {"X402_REPLAY_PER_PAYER": "-1"}, "X402_REPLAY_PER_PAYER"),
    ],
)
def test_bad_config_names_the_key(raw: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(raw, **env)


def test_replay_settings_reach_the_gateway() -> None:
    assert load({}).replay_settings() == ReplaySettings()
    settings = load({"replay_body_max_bytes": 100, "replay_per_payer": 0})
    assert settings.replay_settings() == ReplaySettings(100, 0)
    assert not settings.replay_settings().enabled


def test_edge_settings_for_envoy() -> None:
    assert load({}).edge_config() == Edge()
    edge = load({"edge": {"xff_num_trusted_hops": 2, "trust_request_id": True}}).edge_config()
    assert (edge.xff_num_trusted_hops, edge.trust_request_id) == (2, True)
    assert edge.request_headers_timeout_seconds == Edge().request_headers_timeout_seconds
    origins = ["https://app.example", "http://localhost:3000"]
    assert load({"edge": {"cors_origins": origins}}).edge_config().cors_origins == tuple(origins)
    assert load({"edge": {"cors_origins": []}}).edge_config().cors_origins == ()
    assert Edge().cors_origins == ("*",)


def test_durability_settings() -> None:
    default = load({}).durability_config()
    assert (default.enabled, default.replicas, default.timeout_ms) == (True, 0, 1000)
    chosen = load({"durability": {"money_in": "off", "replicas": 1}}).durability_config()
    assert (chosen.enabled, chosen.replicas) == (False, 1)


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


def test_previous_signing_keys_join_the_key_set(tmp_path: Path) -> None:
    new, old = Identity.generate(), Identity.generate()
    new.save(tmp_path / "new.key")
    old.save(tmp_path / "old.key")
    secret = tmp_path / "invoice.secret"
    write_secret(secret, "0123456789abcdef0123456789abcdef\n")
    raw: dict[str, Any] = {
        "signing_key_file": str(tmp_path / "new.key"),
        "previous_signing_key_files": [str(tmp_path / "old.key")],
        "invoice_secret_file": str(secret),
    }
    gateway = load(raw).gateway()
    assert gateway.payee == new.kid
    assert gateway.keys.public_keys() == {new.kid: new.public_key, old.kid: old.public_key}
    assert gateway.previous_until == 0  # proofs to the old key: as long as it is listed
    ending = load({**raw, "previous_payees_until": 1_800_000_000}).gateway()
    assert ending.pays(old.kid, 1_800_000_000) and not ending.pays(old.kid, 1_800_000_001)

    for value in ("old.key", [""], [1]):
        with pytest.raises(ConfigError, match="previous_signing_key_files: must be a list"):
            load({**raw, "previous_signing_key_files": value})
    cases = [
        ([str(tmp_path / "new.key")], "duplicate_kid", f"{new.kid} appears twice"),
        ([str(tmp_path / "missing.key")], "key_unreadable", r"files\[0\]: cannot read"),
    ]
    for files, reason, message in cases:
        with pytest.raises(KeySetError, match=message) as raised:
            load({**raw, "previous_signing_key_files": files}).gateway()
        assert raised.value.reason == reason


def test_missing_secrets_say_how_to_make_them() -> None:
    with pytest.raises(ConfigError, match="x402 keygen"):
        load({}).gateway()


def test_the_dashboard_public_origin_is_an_origin_and_nothing_more() -> None:
    assert load({}).dashboard_origin() == ""
    origin = load({"dashboard_public_origin": "https://Ops.Example.com/"}).dashboard_origin()
    assert origin == "https://ops.example.com"  # as a browser sends its Origin
    for bad in (
        "ops.example.com",
        "ftp://ops.example.com",
        "https://ops.example.com/dash",
        "https://u:p@ops.example.com",
        "https://ops.example.com?x=1",
        "https://",
    ):
        with pytest.raises(ConfigError, match="config dashboard_public_origin"):
            load({"dashboard_public_origin": bad})  # fmt: skip


def test_the_decision_stream_is_always_capped_in_bytes() -> None:
    assert load({}).decision_stream_max_bytes == 4 * 1024 * 1024
    with pytest.raises(ConfigError, match="config decision_stream_max_bytes: must be at least 1"):
        load({"decision_stream_max_bytes": 0})


def test_a_key_twice_in_the_yaml_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text(
        "routes:\n"
        "  forecast: {method: GET, path: '/v1/forecast/*', price: '0.01'}\n"
        "  forecast: {method: GET, path: '/v1/forecast/{city}', price: '0'}\n"
    )
    with pytest.raises(ConfigError) as raised:
        Settings.load(config, env={})
    message = str(raised.value)
    assert "\n" not in message
    assert "line 3" in message and "'forecast' appears twice" in message


def test_bad_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as raised:
        Settings.load(bad, env={})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (
            {"a": {**ROUTE, "path": "/v1/x"}, "b": {**ROUTE, "path": "/v1/x", "price": "0"}},
            "config routes.a, routes.b: the same route GET /v1/x twice",
        ),
        (
            {"a": {**ROUTE, "path": "/v1/{city}"}, "b": {**ROUTE, "path": "/v1/*"}},
            "config routes.a, routes.b: the same route GET /v1/* twice",
        ),
        (
            {"a": {**ROUTE, "path": "/v1/**"}, "b": {**ROUTE, "path": "/v1/rome/{day}"}},
            "config routes.a, routes.b: both priced routes match GET /v1/rome/x",
        ),
        (
            {"a": {**ROUTE, "method": "*", "path": "/v1/x"}, "b": {**ROUTE, "path": "/v1/x"}},
            "config routes.a, routes.b: both priced routes match GET /v1/x",
        ),
        (
            {"a": {**ROUTE, "path": "/v1/*/b"}, "free": {**ROUTE, "path": "/v1/a/*", "price": 0}},
            "config routes.a, routes.free: the free pattern /v1/a/* also matches GET /v1/a/b",
        ),
        (
            {"a": {**ROUTE, "path": "/v1/forecast*"}},
            "config routes.a.path: '/v1/forecast*': a * must be a whole segment",
        ),
        (
            {"a": {**ROUTE, "path": "/v1/**/x"}},
            "config routes.a.path: '/v1/**/x': ** (the rest of the path) must be the last",
        ),
    ],
)
def test_ambiguous_routes_refuse_to_start(routes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load({"routes": routes})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_free_literal_path_beside_a_priced_pattern_is_clear() -> None:
    table = load(
        {
            "routes": {
                "forecast": {**ROUTE, "path": "/v1/forecast/*"},
                "sample": {**ROUTE, "path": "/v1/forecast/sample", "price": "0"},
                "other_method": {**ROUTE, "method": "POST", "path": "/v1/forecast/*"},
            }
        }
    ).route_table()
    assert table.price_for("GET", "/v1/forecast/sample", {}) is None
    price = table.price_for("GET", "/v1/forecast/rome", {})
    assert price is not None and price.route == "forecast"


@pytest.mark.parametrize(
    ("channels", "says"),
    [
        ("on", "config channels: must be a mapping"),
        ({"min": "1"}, "config channels: unknown key 'min'"),
        ({"self_serve": "yes"}, "config channels.self_serve: must be true or false"),
        ({"asset": "EURF"}, "config channels.asset: 'EURF' is not in assets"),
        ({"min_deposit": 1}, "config channels.min_deposit: write the amount as a string"),
        ({"max_deposit": "0.0000001"}, "config channels.max_deposit"),
        ({"min_deposit": "5", "max_deposit": "1"}, "need 0 < min_deposit <= max_deposit"),
        ({"min_deposit": "0"}, "need 0 < min_deposit <= max_deposit"),
        ({"max_ttl_seconds": 0}, "config channels.max_ttl_seconds"),
        ({"max_ttl_seconds": "1h"}, "config channels.max_ttl_seconds"),
    ],
)
def test_bad_channel_settings_name_the_key(channels: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        load({"channels": channels})


def test_self_serve_channels_by_default_and_off_on_request() -> None:
    terms = load({}).channel_terms()
    assert terms is not None
    assert (terms.asset.code, terms.min_deposit, terms.max_deposit) == ("USDF", 10_000, 10**9)
    assert terms.discovery()["open"] == {"method": "POST", "path": "/x402/channel/open"}
    custom = load({"channels": {"min_deposit": "1", "max_ttl_seconds": 60}}).channel_terms()
    assert custom is not None and (custom.min_deposit, custom.max_ttl_seconds) == (10**6, 60)
    assert load({"channels": {"self_serve": False}}).channel_terms() is None
