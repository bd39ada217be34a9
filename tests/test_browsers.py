"""What a browser sees through the gateway, with the real Envoy and a real service that
answers credentialed CORS for its own origin: the gateway's CORS covers only the answers it
makes itself (discovery, 402s, a payment's preflight, its own failures) and only for the
configured origins; the service's CORS passes untouched; the dashboard's session cookie
never reaches the service. The service is addressed by hostname (a STRICT_DNS cluster)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from sidecar.core.protocol import DISCOVERY_PATH
from sidecar.server.dashboard.auth import COOKIE
from sidecar.tools.stack import LOOPBACK, Process, Stack, wait_http
from tests.support import cors_service
from tests.support.payers import funded_payer_at, pay_direct
from tests.support.routes import ENVOY_ROUTES, ROUTES

ATLAS = "/api/v1/agent/pay-api/atlas"  # GET, 0.25
FREE = "/api/v1/health"
AGENT = "https://agent.example"  # the one origin the gateway's CORS allows here
EVIL = "https://evil.example"
ACAO = "access-control-allow-origin"
ACAC = "access-control-allow-credentials"


class CorsServiceStack(Stack):
    """The stack with tests/support/cors_service.py as the protected service."""

    def start_upstream(self) -> Process:
        port = self.ports["upstream"]
        argv = [sys.executable, "-m", "tests.support.cors_service", str(port)]
        process = self._spawn("upstream", argv)
        wait_http(f"http://{LOOPBACK}:{port}/", process=process)
        return process


@pytest.fixture(scope="module")
def gateway() -> Iterator[Stack]:
    settings = {"edge": {"cors_origins": [AGENT]}}
    stack = CorsServiceStack(
        ROUTES, envoy_routes=ENVOY_ROUTES, settings=settings, service_host="localhost"
    )
    with stack as running:
        yield running


def get(stack: Stack, method: str, path: str, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        return client.request(method, path, headers=headers)


def assert_the_services_own_cors(response: httpx.Response) -> None:
    assert response.headers.get_list(ACAO) == [cors_service.ORIGIN]
    assert response.headers.get_list(ACAC) == ["true"]  # the service's, once, untouched


def test_the_service_is_a_hostname_and_envoy_resolves_it(gateway: Stack) -> None:
    config = yaml.safe_load((gateway.dir / "envoy.yaml").read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["service"]["type"] == "STRICT_DNS"
    address = clusters["service"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"]["address"] == "localhost"
    assert get(gateway, "GET", FREE).status_code == 200  # served through it


@pytest.mark.parametrize("origin", [EVIL, AGENT])
async def test_the_services_answers_keep_their_own_cors(gateway: Stack, origin: str) -> None:
    """Free and paid answers alike: no gateway origin, no gateway credentials."""
    free = get(gateway, "GET", FREE, Origin=origin)
    assert free.status_code == 200
    assert_the_services_own_cors(free)
    wallet = await funded_payer_at(gateway.redis_url, 250_000)
    paid = get(
        gateway, "GET", ATLAS, Origin=origin, **pay_direct(gateway, wallet, f"GET {ATLAS}", "0.25")
    )
    assert paid.status_code == 200, paid.text
    assert_the_services_own_cors(paid)


def test_the_services_own_preflight_reaches_it(gateway: Stack) -> None:
    preflight = {
        "Origin": cors_service.ORIGIN,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": cors_service.SERVICE_HEADER,
    }
    response = get(gateway, "OPTIONS", FREE, **preflight)
    assert response.status_code == 204
    assert_the_services_own_cors(response)
    assert response.headers["access-control-allow-headers"] == cors_service.SERVICE_HEADER


def assert_the_gateways_cors(response: httpx.Response, origin: str) -> None:
    if origin == AGENT:
        assert response.headers.get_list(ACAO) == [AGENT]
        assert "payment-required" in response.headers["access-control-expose-headers"]
    else:
        assert ACAO not in response.headers
    assert ACAC not in response.headers


@pytest.mark.parametrize("origin", [EVIL, AGENT])
def test_the_gateways_own_answers_carry_cors_for_configured_origins(
    gateway: Stack, origin: str
) -> None:
    challenge = get(gateway, "GET", ATLAS, Origin=origin)
    assert challenge.status_code == 402
    assert_the_gateways_cors(challenge, origin)
    discovery = get(gateway, "GET", DISCOVERY_PATH, Origin=origin)
    assert discovery.status_code == 200
    assert_the_gateways_cors(discovery, origin)
    # Envoy's own refusal (an escaped slash in the path): the JSON envelope, same CORS.
    refused = get(gateway, "GET", "/api/v1%2Fhealth", Origin=origin)
    assert (refused.status_code, refused.json()["error"]) == (400, "bad_request")
    assert_the_gateways_cors(refused, origin)


def test_a_payments_preflight_is_answered_for_configured_origins_only(gateway: Stack) -> None:
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "payment-signature",
    }
    allowed = get(gateway, "OPTIONS", ATLAS, Origin=AGENT, **preflight)
    assert allowed.status_code == 200
    assert allowed.headers.get_list(ACAO) == [AGENT]
    assert "payment-signature" in allowed.headers["access-control-allow-headers"]
    assert ACAC not in allowed.headers
    # Another origin's preflight is not the gateway's to answer: the service answers it.
    other = get(gateway, "OPTIONS", ATLAS, Origin=EVIL, **preflight)
    assert other.headers.get_list(ACAO) == [cors_service.ORIGIN]


def cookies_upstream(stack: Stack, path: str, cookie: str, **headers: str) -> Any:
    response = get(stack, "GET", path, Cookie=cookie, **headers)
    assert response.status_code == 200, response.text
    return response.json()["cookies"]


async def test_the_dashboard_cookie_never_reaches_the_service(gateway: Stack) -> None:
    jar = f"a=1; {COOKIE}=session; __Host-{COOKIE}=tls-session;b=2; {COOKIE}x=kept"
    assert cookies_upstream(gateway, FREE, jar) == [f"a=1; b=2; {COOKIE}x=kept"]
    assert cookies_upstream(gateway, FREE, f"{COOKIE}=session") == []
    assert cookies_upstream(gateway, FREE, "a=1;b=2") == ["a=1;b=2"]  # untouched
    wallet = await funded_payer_at(gateway.redis_url, 250_000)
    paid = pay_direct(gateway, wallet, f"GET {ATLAS}", "0.25")
    assert cookies_upstream(gateway, ATLAS, f"{COOKIE}=s; c=3", **paid) == ["c=3"]


def test_any_origin_by_default_on_the_gateways_answers_never_the_services(stack: Stack) -> None:
    """The session stack: the default `cors_origins: ["*"]`, the demo service (no CORS)."""
    challenge = get(stack, "GET", ATLAS, Origin=EVIL)
    assert challenge.status_code == 402
    assert challenge.headers.get_list(ACAO) == ["*"]
    assert ACAC not in challenge.headers
    served = get(stack, "GET", FREE, Origin=EVIL)
    assert served.status_code == 200
    assert ACAO not in served.headers
