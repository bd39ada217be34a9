"""The sidecar's listeners without a stack: the admin API refused off loopback without
TLS, the side port's connection cap, the probes' own port, and the drain that outlasts
the longest settle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.core.errors import ConfigError
from sidecar.server import supervisor
from sidecar.server.admin import check_listener
from sidecar.server.config import Settings
from sidecar.server.side_port import AnyReply, Headers, start_http
from sidecar.tools.stack import LOOPBACK, free_port

TOKEN = {"admin_token_file": "/run/x402/admin.token"}


def settings(**raw: Any) -> Settings:
    return Settings.from_mapping(raw, {})


@pytest.mark.parametrize("listen", ["0.0.0.0:8999", "[::]:8999", "10.0.0.7:8999", "pod:8999"])
def test_an_admin_api_off_loopback_without_tls_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^config listen_admin: .* needs TLS"):
        check_listener(settings(listen_admin=listen, **TOKEN))


@pytest.mark.parametrize("listen", ["127.0.0.1:8999", "[::1]:8999", "localhost:8999"])
def test_an_admin_api_on_loopback_or_with_tls_starts(listen: str) -> None:
    check_listener(settings(listen_admin=listen, **TOKEN))
    tls = {"admin_tls_cert_file": "/tls/tls.crt", "admin_tls_key_file": "/tls/tls.key"}
    check_listener(settings(listen_admin="0.0.0.0:8999", **TOKEN, **tls))
    # Without a credential the admin API does not start at all: nothing to refuse.
    check_listener(settings(listen_admin="0.0.0.0:8999"))


def test_the_drain_outlasts_the_longest_settle() -> None:
    assert supervisor.drain_seconds(settings()) == supervisor.SHUTDOWN_GRACE_SECONDS
    exact = settings(
        onchain={"USDF": {"network": "eip155:8453", "token": "0x" + "11" * 20, "name": "USD Coin",
                          "version": "2", "decimals": 6}},
        facilitator_url="https://facilitator.example",
        pay_to="0x" + "22" * 20,
        facilitator_verify_timeout_ms=5000,
        facilitator_settle_timeout_ms=20000,
        chain_lookup_ms=3000,
        redis_timeout_ms=500,
    )  # fmt: skip
    # verify + settle + chain lookup + 4 ledger steps + 2 s, as the top-up's Envoy timeout.
    assert supervisor.drain_seconds(exact) == 32.0


def test_the_probes_port_must_not_overlap_the_workers() -> None:
    with pytest.raises(ConfigError, match="listen_health: its ports overlap"):
        supervisor.worker_addresses(
            settings(listen_grpc="127.0.0.1:9001", listen_health="0.0.0.0:9002", workers=2)
        )


async def test_the_side_port_caps_its_connections() -> None:
    release, both = asyncio.Event(), asyncio.Event()
    arrived: list[str] = []

    async def slow(method: str, path: str, headers: Headers) -> AnyReply:
        arrived.append(path)
        if len(arrived) == 2:
            both.set()
        await release.wait()
        return 200, "text/plain", b"ok"

    port = free_port()
    server = await start_http(slow, LOOPBACK, port, max_connections=2)
    held = []
    try:
        for _ in range(2):  # two requests the responder holds
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            held.append((reader, writer))
        await both.wait()
        # A third connection is told 503 at once and closed, unread.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        busy = await reader.read()
        writer.close()
        assert busy.startswith(b"HTTP/1.1 503 ") and busy.endswith(b'{"error":"busy"}\n')
        release.set()
        for reader, writer in held:
            assert (await reader.read()).startswith(b"HTTP/1.1 200 OK\r\n")
            writer.close()
    finally:
        server.close()
