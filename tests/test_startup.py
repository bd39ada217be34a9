"""Start-up never fails open (issue #30): path wildcards price what they say through Envoy;
duplicates, overlaps and ports in use refuse to start in one line; `x402 serve` prints the
route table it enforces."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.tools.stack import LOOPBACK, Stack, free_port
from tests.support.payers import funded_payer_at, pay_invoice
from tests.support.serving import serve, serve_config, serving, wait_log

WILDCARDS = {
    "forecast": {"method": "GET", "path": "/v1/forecast/*", "price": "0.01"},
    "sample": {"method": "GET", "path": "/v1/forecast/sample", "price": "0"},
    "files": {"method": "GET", "path": "/files/**", "price": "0.02", "charge": "on_success"},
}


@pytest.fixture(scope="module")
def wild_stack() -> Iterator[Stack]:
    """Priced by the sidecar's table and Envoy's routes alike, unlisted paths free."""
    with Stack(WILDCARDS) as running:
        yield running


async def test_wildcards_price_their_paths_through_envoy(wild_stack: Stack) -> None:
    wallet = await funded_payer_at(wild_stack.redis_url, 1_000_000)
    async with httpx.AsyncClient(base_url=wild_stack.url, timeout=10) as http:
        for path in ("/v1/forecast/rome", "/files/a", "/files/a/b/c.txt"):
            challenge = await http.get(path)
            assert challenge.status_code == 402, path
        assert (await http.get("/v1/forecast/sample")).status_code == 200  # free, listed
        assert (await http.get("/v1/forecast")).status_code == 200  # unlisted: pass
        challenge = await http.get("/v1/forecast/rome")
        paid = await http.get("/v1/forecast/rome", headers=pay_invoice(challenge, wallet))
        assert paid.status_code == 200, paid.text
        assert paid.json()["amount"] == "0.01" and paid.json()["hold"] is None  # charged
        challenge = await http.get("/files/a/b")
        paid = await http.get("/files/a/b", headers=pay_invoice(challenge, wallet))
        assert paid.status_code == 200, paid.text  # on_success: the hold captured
        # The service is told the amount is a hold (x-x402-hold), captured at the response.
        assert paid.json()["amount"] == "0.02" and paid.json()["hold"] == "true"
        forged = await http.get("/v1/forecast/sample", headers={"x-x402-hold": "true"})
        assert forged.status_code == 200 and forged.json()["hold"] is None  # stripped
    assert await wild_stack.balance(wallet.public_key) == 1_000_000 - 10_000 - 20_000


def one_line_refusal(config: Path, *words: str) -> None:
    result = serve(config)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("routes", "words"),
    [
        (
            {
                "a": {"method": "GET", "path": "/v1/forecast/*", "price": "0.01"},
                "b": {"method": "GET", "path": "/v1/forecast/{city}", "price": "0.02"},
            },
            ["routes.a, routes.b: the same route GET /v1/forecast/{city} twice"],
        ),
        (
            {
                "a": {"method": "*", "path": "/v1/**", "price": "0.01"},
                "b": {"method": "GET", "path": "/v1/forecast/rome", "price": "0.02"},
            },
            ["routes.a, routes.b: both priced routes match GET /v1/forecast/rome"],
        ),
        (
            {"a": {"method": "GET", "path": "/v1/forecast*", "price": "0.01"}},
            ["routes.a.path", "a * must be a whole segment"],
        ),
    ],
)
def test_ambiguous_routes_refuse_to_start(
    tmp_path: Path, routes: dict[str, dict[str, str]], words: list[str]
) -> None:
    one_line_refusal(serve_config(tmp_path, routes=routes), *words)


def test_a_route_name_twice_refuses_to_start(tmp_path: Path) -> None:
    config = serve_config(tmp_path)
    config.write_text(
        config.read_text()
        + "routes:\n"
        + "  forecast: {method: GET, path: '/v1/forecast/*', price: '0.01'}\n"
        + "  forecast: {method: GET, path: '/v1/forecast/{city}', price: '0'}\n"
    )
    one_line_refusal(config, "the key 'forecast' appears twice")


@pytest.mark.parametrize("key", ["listen_grpc", "listen_http", "listen_authz_http"])
def test_a_port_in_use_refuses_to_start(tmp_path: Path, key: str) -> None:
    port = free_port()
    config = serve_config(tmp_path, transport="http", **{key: f"{LOOPBACK}:{port}"})
    with socket.socket() as other:
        other.bind((LOOPBACK, port))
        other.listen()
        one_line_refusal(config, f"config {key}: port {port}", "in use")


def test_serve_prints_the_route_table_and_why_the_ledger_is_down(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:pw-s3cret@{LOOPBACK}:{port}/0"
    config = serve_config(tmp_path, routes=WILDCARDS, redis_url=url, unlisted="deny")
    with serving(config):
        line = wait_log(config, "ledger.unavailable")
    table = config.with_suffix(".err").read_text().splitlines()
    assert table[0] == (
        "x402 serve: 3 routes enforced; unlisted: deny "
        "(a path no route lists is refused: 404 unknown_route)"
    )
    rows = [row.split() for row in table[1:4]]
    schemes = "prepaid-ed25519,channel-ed25519"
    assert rows[0] == ["GET", "/v1/forecast/*", "0.01", "USDF", "on_check", schemes]
    assert rows[1] == ["GET", "/v1/forecast/sample", "free", "-", "-"]
    assert rows[2][:5] == ["GET", "/files/**", "0.02", "USDF", "on_success"]
    assert line["redis_url"] == f"redis://:***@{LOOPBACK}:{port}/0"
    assert f"cannot connect to Redis at {LOOPBACK}:{port}" in line["cause"]
    assert "pw-s3cret" not in config.with_suffix(".out").read_text()
    assert yaml.safe_load(config.read_text())["unlisted"] == "deny"
