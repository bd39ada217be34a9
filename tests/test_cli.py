"""The `x402` command line against a real Redis: keys, payers, configs, readable errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.core.identity import Identity, write_secret
from sidecar.server.envoy import phase_call
from sidecar.server.envoy.contract import EXT_AUTHZ, EXT_PROC
from sidecar.server.envoy.edge import Endpoints
from sidecar.server.envoy.render import render_yaml
from sidecar.tools.stack import Process, Stack, find_binary, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]


def assert_valid_envoy(config: Path) -> None:
    """Envoy itself accepts the config (`envoy --mode validate`)."""
    validated = subprocess.run(
        [find_binary("envoy"), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def x402(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def public_key() -> str:
    """A fresh payer key that starts with "-", as 1 in 64 do: every command must take it as
    typed, not mistake it for an option."""
    while not (key := Identity.generate().public_key).startswith("-"):
        pass
    return key


KEY = public_key()  # an unregistered payer


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") or result.stderr.startswith("Usage"), result.stderr
    for word in words:
        assert word in result.stderr


def test_keygen_writes_a_private_key_0600_and_prints_the_public_key(tmp_path: Path) -> None:
    out = tmp_path / "agent.key"
    result = x402("keygen", "--out", str(out))
    assert result.returncode == 0
    identity = Identity.load(out)
    assert f"public key: {identity.public_key}" in result.stdout
    # an agent's payer id and what to run with it; the gw_ id only as a gateway's
    assert f"x402 payer register {identity.public_key}" in result.stdout
    assert f"as a gateway's signing key, its payee id: {identity.kid}" in result.stdout
    assert "key id:" not in result.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert identity.seed_text not in result.stdout
    assert_one_line_error(x402("keygen", "--out", str(out)), "refusing to overwrite")


def test_payer_lifecycle_with_idempotent_credit(stack: Stack) -> None:
    key = public_key()
    redis = ["--redis", stack.redis_url]

    assert x402("payer", "register", key, *redis).stdout.strip() == "registered"
    assert x402("payer", "register", key, *redis).stdout.strip() == "already registered"
    first = x402("payer", "credit", key, "10.5", "--idempotency-key", "topup-1", *redis)
    assert first.returncode == 0 and "credited; balance 10.5 USDF" in first.stdout
    retried = x402("payer", "credit", key, "10.5", "--idempotency-key", "topup-1", *redis)
    assert "already applied" in retried.stdout and "balance 10.5 USDF" in retried.stdout
    # REDIS_URL is the default, as for any Redis tool.
    balance = x402("payer", "balance", key, env={"REDIS_URL": stack.redis_url})
    assert balance.stdout.splitlines() == ["status: active", "USDF: 10.5"]
    assert x402("payer", "suspend", key, *redis).returncode == 0
    assert "status: suspended" in x402("payer", "balance", key, *redis).stdout
    assert x402("payer", "activate", key, *redis).returncode == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["payer", "register", "not-a-key"], ["not a public key"]),
        (
            ["payer", "credit", public_key(), "0.0000001", "--idempotency-key", "k"],
            ["more than 6 decimals"],
        ),
        (
            ["payer", "credit", public_key(), "1e3", "--idempotency-key", "k"],
            ["not a non-negative decimal"],
        ),
        (
            ["payer", "credit", KEY, "1", "--idempotency-key", "k"],
            ["not registered", f"register it first: x402 payer register {KEY}"],
        ),
        (
            ["payer", "credit", public_key(), "1", "--asset", "BTC", "--idempotency-key", "k"],
            ["unknown asset"],
        ),
        (
            ["payer", "credit", public_key(), "1"],
            ["--idempotency-key is required", "never credits twice"],
        ),
        (["payer", "balance", public_key()], ["not registered"]),
    ],
)
def test_payer_errors_are_one_readable_line(
    stack: Stack, args: list[str], words: list[str]
) -> None:
    assert_one_line_error(x402(*args, "--redis", stack.redis_url), *words)


def test_ledger_unreachable_is_a_readable_error() -> None:
    key = public_key()
    result = x402("payer", "register", key, "--redis", "redis://:s3cret@127.0.0.1:1/0")
    assert_one_line_error(
        result, "ledger at redis://:***@127.0.0.1:1/0 unavailable", "Error 111 connecting"
    )
    assert "s3cret" not in result.stderr


def test_a_database_that_does_not_exist_is_named(stack: Stack) -> None:
    url = stack.redis_url.rsplit("/", 1)[0] + "/99"
    result = x402("payer", "register", public_key(), "--redis", url)
    assert_one_line_error(result, "/99 unavailable", "DB index is out of range")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:6379/0", ["redis://, rediss://, unix://, redis+cluster://"]),
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", ["need a rediss:// URL"]),
        ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent.pem", ["/nonexistent.pem"]),
        ("rediss://127.0.0.1:6379/0?sslcacerts=/ca.pem", ["unknown query parameter"]),
    ],
)
def test_bad_redis_urls_say_what_is_supported(url: str, words: list[str]) -> None:
    assert_one_line_error(x402("payer", "register", public_key(), "--redis", url), *words)


def test_serve_refuses_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "x402.yaml"
    config.write_text(yaml.safe_dump({"routes": {"atlas": {"path": "/a", "price": 0.25}}}))
    assert_one_line_error(x402("serve", "--config", str(config)), "routes.atlas.price")
    config.write_text(yaml.safe_dump({"signing_key_file": str(tmp_path / "none")}))
    env = {"X402_INVOICE_SECRET_FILE": str(tmp_path / "none")}
    assert_one_line_error(x402("serve", "--config", str(config), env=env), "signing_key_file")


def test_serve_refuses_an_admin_api_off_loopback_without_tls(tmp_path: Path) -> None:
    Identity.generate().save(tmp_path / "signing.key")
    for name in ("invoice.secret", "admin.token"):
        write_secret(tmp_path / name, "s" * 32 + "\n")
    config = tmp_path / "x402.yaml"
    raw = {
        "signing_key_file": str(tmp_path / "signing.key"),
        "invoice_secret_file": str(tmp_path / "invoice.secret"),
        "admin_token_file": str(tmp_path / "admin.token"),
        "listen_admin": "0.0.0.0:8999",
    }
    config.write_text(yaml.safe_dump(raw))
    refused = x402("serve", "--config", str(config))
    assert_one_line_error(refused, "config listen_admin: 0.0.0.0:8999", "needs TLS")
    assert len(refused.stderr.splitlines()) == 1, refused.stderr


def test_reference_envoy_config_is_generated_from_the_example_and_valid(tmp_path: Path) -> None:
    example = yaml.safe_load((ROOT / "envoy" / "x402.yaml").read_text())
    checked_in = (ROOT / "envoy" / "envoy.yaml").read_text()
    workers = Endpoints(authz_workers=example["workers"])  # one endpoint per sidecar worker
    assert checked_in == render_yaml(example["routes"], example["default_asset"], workers), (
        "envoy/envoy.yaml is stale: x402 envoy-config --config envoy/x402.yaml > envoy/envoy.yaml"
    )
    # The reference is the default transport, whatever X402_TRANSPORT this run has.
    result = x402(
        "envoy-config",
        "--config",
        str(ROOT / "envoy" / "x402.yaml"),
        env={"X402_TRANSPORT": "grpc"},
    )
    assert result.stdout == checked_in
    assert_valid_envoy(ROOT / "envoy" / "envoy.yaml")


def test_envoy_config_takes_the_edge_settings_and_stays_valid(tmp_path: Path) -> None:
    example = yaml.safe_load((ROOT / "envoy" / "x402.yaml").read_text())
    edge = {
        "xff_num_trusted_hops": 2,
        "trust_request_id": True,
        "strip_method_override": False,
        "request_headers_timeout_seconds": 0,  # off
        "upstream_timeout_seconds": 60,
        "max_connections": 0,  # no cap
        "max_heap_bytes": 1 << 30,  # shed load near 1 GiB
    }
    config = tmp_path / "x402.yaml"
    config.write_text(yaml.safe_dump({**example, "edge": edge}))

    result = x402("envoy-config", "--config", str(config))

    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    assert (hcm["xff_num_trusted_hops"], hcm["preserve_external_request_id"]) == (2, True)
    assert hcm["request_headers_timeout"] == "0s"
    removed = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert {"remove": "x-request-id"} not in removed
    assert {"remove": "x-http-method-override"} not in removed
    monitors = rendered["overload_manager"]["resource_monitors"]
    assert [m["name"] for m in monitors] == ["envoy.resource_monitors.fixed_heap"]
    (tmp_path / "envoy.yaml").write_text(result.stdout)
    assert_valid_envoy(tmp_path / "envoy.yaml")

    config.write_text(yaml.safe_dump({**example, "edge": {"xff_num_trusted_hops": "two"}}))
    assert_one_line_error(x402("envoy-config", "--config", str(config)), "edge.xff_num_trusted")


def test_envoy_config_renders_the_http_transport_valid(tmp_path: Path) -> None:
    """`--transport http`: ext_authz's http_service at the workers' HTTP ports, no price
    annotations (the sidecar prices from its table), the response phase announced per route."""
    example = yaml.safe_load((ROOT / "envoy" / "x402.yaml").read_text())
    routes = {
        **example["routes"],
        "held": {"method": "GET", "path": "/api/held", "price": "0.01", "charge": "on_success"},
    }
    config = tmp_path / "x402.yaml"
    config.write_text(yaml.safe_dump({**example, "routes": routes}))

    result = x402("envoy-config", "--config", str(config), "--transport", "http")

    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    ext_authz = next(f for f in hcm["http_filters"] if f["name"] == EXT_AUTHZ)["typed_config"]
    assert "grpc_service" not in ext_authz
    service = ext_authz["http_service"]
    assert service["server_uri"]["cluster"] == "x402_authz_http"
    allowed = {p["exact"] for p in ext_authz["allowed_headers"]["patterns"]}
    assert {"x-payment", "payment-signature"} <= allowed and "cookie" not in allowed
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    endpoints = clusters["x402_authz_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(endpoints) == example["workers"]
    priced = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    assert EXT_AUTHZ not in priced[next(iter(example["routes"]))].get("typed_per_filter_config", {})
    phase = priced["held"]["typed_per_filter_config"][EXT_AUTHZ]["check_settings"]
    added = phase["http_service"]["authorization_request"]["headers_to_add"]
    assert {"key": "x-x402-phase", "value": "response"} in added
    (tmp_path / "envoy.yaml").write_text(result.stdout)
    assert_valid_envoy(tmp_path / "envoy.yaml")


@pytest.mark.parametrize(("transport", "replay_per_payer"), [("grpc", 64), ("http", 0)])
def test_a_held_routes_phase_is_the_lua_call_whichever_the_transport(
    tmp_path: Path, transport: str, replay_per_payer: int
) -> None:
    """A held route's response phase is the Lua filter's call to the sidecar's HTTP
    listener (server/envoy/phase_call.py) over either transport, with the body up to the
    edge's buffer when responses are kept; the MCP routes' ext_proc is absent without one."""
    example = yaml.safe_load((ROOT / "envoy" / "x402.yaml").read_text())
    held = {"method": "GET", "path": "/api/held", "price": "0.01", "charge": "on_success"}
    config = tmp_path / "x402.yaml"
    config.write_text(
        yaml.safe_dump(
            {**example, "routes": {**example["routes"], "held": held},
             "transport": transport, "replay_per_payer": replay_per_payer}
        )
    )  # fmt: skip
    result = x402("envoy-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]
    hcm = hcm["filters"][0]["typed_config"]
    [call] = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == phase_call.NAME]
    source = call["source_codes"][phase_call.SOURCE]["inline_string"]
    assert f"local keep = {1 if replay_per_payer else 0}" in source
    assert all(f["name"] != EXT_PROC for f in hcm["http_filters"])
    [route] = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == "held"]
    per_route = route["typed_per_filter_config"]
    assert per_route[phase_call.NAME]["name"] == per_route[phase_call.DROP_NAME]["name"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index(phase_call.DROP_NAME) < names.index(phase_call.NAME)  # after, going out
    clusters = [c["name"] for c in rendered["static_resources"]["clusters"]]
    assert "x402_authz_http" in clusters
    (tmp_path / "envoy.yaml").write_text(result.stdout)
    assert_valid_envoy(tmp_path / "envoy.yaml")


def test_envoy_config_addresses_a_hostname_by_dns_and_stays_valid(tmp_path: Path) -> None:
    """Every Kubernetes Service is a hostname: STRICT_DNS for it, STATIC for IP literals.
    (tests/test_browsers.py serves requests through a hostname-addressed service.)"""
    result = x402("envoy-config", "--service", "my-service:8080")
    assert result.returncode == 0, result.stderr
    clusters = {c["name"]: c for c in yaml.safe_load(result.stdout)["static_resources"]["clusters"]}
    assert clusters["service"]["type"] == "STRICT_DNS"
    assert {clusters[name]["type"] for name in ("x402_authz", "x402_http")} == {"STATIC"}
    (tmp_path / "envoy.yaml").write_text(result.stdout)
    assert_valid_envoy(tmp_path / "envoy.yaml")


def test_a_second_envoy_on_the_same_listen_address_fails_to_start(tmp_path: Path) -> None:
    """The admin address comes from the config (`envoy_admin`) or `--admin`; the listener
    refuses to share its port (`enable_reuse_port: false`)."""
    taken: set[int] = set()
    listen, first_admin, second_admin = (f"127.0.0.1:{free_port(taken)}" for _ in range(3))
    config = tmp_path / "x402.yaml"
    config.write_text(yaml.safe_dump({"envoy_admin": first_admin}))
    argv = [find_binary("envoy"), "--use-dynamic-base-id", "--log-level", "warn", "-c"]
    first = tmp_path / "first.yaml"
    first.write_text(x402("envoy-config", "--config", str(config), "--listen", listen).stdout)
    running = Process("envoy", [*argv, str(first)], tmp_path / "first.log").start()
    try:
        wait_http(f"http://{first_admin}/ready", timeout=30, process=running)
        second = tmp_path / "second.yaml"
        rendered = x402("envoy-config", "--listen", listen, "--admin", second_admin)
        second.write_text(rendered.stdout)
        refused = subprocess.run(
            [*argv, str(second)], capture_output=True, text=True, timeout=60, check=False
        )
        assert refused.returncode != 0
        assert "Address already in use" in refused.stdout + refused.stderr
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cors-origin", "https://App.example/"], ["edge.cors_origins", "not an origin"]),
        (["--cors-origin", "*", "--cors-origin", "https://a.example"], ["list it alone"]),
        (["--admin", "nope"], ["--admin", "not host:port"]),
    ],
)
def test_envoy_config_refuses_bad_origins_and_addresses(args: list[str], words: list[str]) -> None:
    assert_one_line_error(x402("envoy-config", *args), *words)
