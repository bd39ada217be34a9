"""Envoy as the edge, through the real stack: nothing a client sends poses as the gateway,
slow clients are cut, and Envoy's own failures speak the JSON envelope of protocol.md §5
while the sidecar's denials reach the client as the sidecar wrote them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.server.envoy.contract import METHOD_OVERRIDE_HEADERS
from sidecar.tools.stack import LOOPBACK, Stack
from tests.support.payers import funded_payer, pay_direct
from tests.support.routes import ENVOY_ROUTES, ROUTES
from tests.support.stacks import ask_sidecar, over_http

ATLAS = "/api/v1/agent/pay-api/atlas"  # GET only, 0.25
FREE = "/api/v1/health"
FORGED_PAYER = "F" * 43
# The gateway's headers, a future one, and their underscore twins (the same name to CGI/WSGI).
FORGED = {
    "x-x402-payer": FORGED_PAYER,
    "x-x402-amount": "1000000",
    "x-x402-receipt-id": "rcpt_forged",
    "X-X402-Something-Added-Later": "forged",
    "x_x402_payer": FORGED_PAYER,
    "x-x402_payer": FORGED_PAYER,
    "x_x402-amount": "1000000",
}
# A priced path with a method it does not price still goes through; so do free routes.
# Requests the sidecar lets through without a charge (HEAD on a GET-priced route pays: see
# tests/test_refusals.py).
UNCHARGED = [("GET", FREE), ("HEAD", FREE), ("POST", ATLAS), ("DELETE", ATLAS)]
RATE_LIMITED_BY_ADDRESS = {"rate_limit_ip_per_second": 1, "rate_limit_ip_burst": 1000}


def gateway_like(name: str) -> bool:
    return name.lower().replace("_", "-").startswith("x-x402-")


@pytest.fixture(scope="module")
def edge() -> Iterator[Stack]:
    """The default edge settings, but headers must arrive within 1 s."""
    settings = {"edge": {"request_headers_timeout_seconds": 1}, **RATE_LIMITED_BY_ADDRESS}
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
def trusting() -> Iterator[Stack]:
    """Behind one trusted proxy, which also assigns the request ids."""
    settings = {
        "edge": {"trust_request_id": True, "xff_num_trusted_hops": 1},
        **RATE_LIMITED_BY_ADDRESS,
    }
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
def faults() -> Iterator[Stack]:
    """A stack whose parts the tests stop and start again; the service may take 1 s."""
    settings = {"edge": {"upstream_timeout_seconds": 1}}
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, settings=settings) as running:
        yield running


MARKER = "x-edge-test"  # a header of no meaning to the gateway, to find a request upstream


def send(
    stack: Stack, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    marked = {**(headers or {}), MARKER: os.urandom(8).hex()}
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        return client.request(method, path, headers=marked)


def upstream_saw(stack: Stack, response: httpx.Response | str) -> dict[str, str]:
    """The headers of the request that reached the service (the demo upstream logs each
    request's headers), found by the marker header it was sent with."""
    marker = response if isinstance(response, str) else response.request.headers[MARKER]
    deadline = time.monotonic() + 5
    while True:
        for seen in stack.upstream_requests():
            if seen["headers"].get(MARKER) == marker:
                headers: dict[str, str] = seen["headers"]
                return headers
        if time.monotonic() > deadline:
            raise AssertionError(f"no upstream request with {MARKER}: {marker}")
        time.sleep(0.05)


def decision(stack: Stack, request_id: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in stack.decisions():
            if line["request_id"] == request_id:
                return line
        time.sleep(0.05)
    return None


def expect_envelope(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """Envoy's own failure in the sidecar's JSON envelope."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"] == reason and isinstance(body["message"], str) and body["message"]
    return body


def paid_headers(stack: Stack, wallet: Identity) -> dict[str, str]:
    return pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")


async def new_payer(stack: Stack, amount: int = 1_000_000) -> Identity:
    ledger = Ledger.from_url(stack.redis_url)
    try:
        return await funded_payer(ledger, amount)
    finally:
        await ledger.close()


# -- 1. headers the gateway asserts --------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), UNCHARGED)
def test_forged_gateway_headers_never_reach_the_service(
    edge: Stack, method: str, path: str
) -> None:
    response = send(edge, method, path, FORGED)
    assert response.status_code == 200

    seen = upstream_saw(edge, response)
    assert [name for name in seen if gateway_like(name)] == []


def test_forged_gateway_headers_are_stripped_over_http2_too(edge: Stack) -> None:
    marker = os.urandom(8).hex()
    forged = {**FORGED, MARKER: marker}
    out = subprocess.run(
        [
            *("curl", "-s", "-i", "--http2-prior-knowledge"),
            *(arg for name, value in forged.items() for arg in ("-H", f"{name}: {value}")),
            edge.url + FREE,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.startswith("HTTP/2 200")
    assert [name for name in upstream_saw(edge, marker) if gateway_like(name)] == []


async def test_a_paid_request_carries_the_sidecars_values_not_the_clients(edge: Stack) -> None:
    wallet = await new_payer(edge)

    paid = send(edge, "GET", ATLAS, {**FORGED, **paid_headers(edge, wallet)})

    assert paid.status_code == 200
    receipt = protocol.decode_header(paid.headers["x-payment-response"])
    seen = upstream_saw(edge, paid)
    gateway = {name: value for name, value in seen.items() if gateway_like(name)}
    assert gateway == {
        "x-x402-payer": wallet.public_key,
        "x-x402-amount": "0.25",
        "x-x402-receipt-id": receipt["receipt_id"],
    }


# -- 2. method overrides -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", FREE), ("POST", ATLAS)])
def test_method_override_headers_are_stripped(edge: Stack, method: str, path: str) -> None:
    overrides = {name: "DELETE" for name in METHOD_OVERRIDE_HEADERS}
    assert set(overrides) == {"x-http-method-override", "x-http-method", "x-method-override"}

    response = send(edge, method, path, {name.title(): v for name, v in overrides.items()})

    assert response.status_code == 200
    assert set(upstream_saw(edge, response)) & set(overrides) == set()


# -- 3. request ids ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [ATLAS, FREE])
def test_a_client_request_id_is_replaced_by_the_gateways(edge: Stack, path: str) -> None:
    forged = f"forged-{os.urandom(4).hex()}"

    response = send(edge, "GET", path, {"x-request-id": forged})

    assigned = response.headers.get("x-request-id")  # the gateway tells the client its id
    assert assigned is not None and assigned != forged
    line = decision(edge, assigned)
    assert line is not None and line["path"] == path
    assert all(line["request_id"] != forged for line in edge.decisions())
    if response.status_code == 200:
        assert upstream_saw(edge, response)["x-request-id"] == assigned


def test_a_trusted_request_id_is_kept(trusting: Stack) -> None:
    mine = f"proxy-{os.urandom(4).hex()}"

    response = send(trusting, "GET", ATLAS, {"x-request-id": mine})

    assert response.status_code == 402
    assert response.headers["x-request-id"] == mine
    line = decision(trusting, mine)
    assert line is not None and line["reason"] == "payment_required"


# -- 4. X-Forwarded-For and the client address -----------------------------------------------


def address_buckets(stack: Stack) -> set[str]:
    """The client addresses with a rate-limit bucket (each expires 1 s after a check)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return {key.decode() for key in client.scan_iter("x402:ip:*")}
    finally:
        client.close()


async def test_x_forwarded_for_cannot_choose_the_client_address(edge: Stack) -> None:
    wallet = await new_payer(edge)

    paid = send(edge, "GET", ATLAS, {"x-forwarded-for": "9.9.9.9", **paid_headers(edge, wallet)})

    assert paid.status_code == 200
    buckets = address_buckets(edge)  # the sidecar's per-address limit keyed on the real peer
    assert "x402:ip:{127.0.0.1}" in buckets and "x402:ip:{9.9.9.9}" not in buckets
    seen = upstream_saw(edge, paid)
    assert seen["x-envoy-external-address"] == LOOPBACK
    # Envoy appends the peer; for a loopback peer it appends its own non-loopback address.
    forwarded = [hop.strip() for hop in seen["x-forwarded-for"].split(",")]
    assert len(forwarded) == 2 and forwarded[0] == "9.9.9.9" and forwarded[1] != "9.9.9.9"


async def test_a_trusted_proxy_names_the_client_to_the_service(trusting: Stack) -> None:
    wallet = await new_payer(trusting)

    paid = send(
        trusting, "GET", ATLAS, {"x-forwarded-for": "9.9.9.9", **paid_headers(trusting, wallet)}
    )

    assert paid.status_code == 200
    assert upstream_saw(trusting, paid)["x-envoy-external-address"] == "9.9.9.9"
    if over_http(trusting):  # the check carries Envoy's x-envoy-external-address
        assert address_buckets(trusting) == {"x402:ip:{9.9.9.9}"}
    else:
        # The per-address limit keys on the TCP peer all the same (ext_authz's source
        # address): behind a balancer, the PROXY protocol (docs/configuration.md).
        assert address_buckets(trusting) == {"x402:ip:{127.0.0.1}"}


@pytest.mark.parametrize("trusted", [False, True])
def test_the_402_names_the_url_agents_reached_only_through_a_trusted_proxy(
    edge: Stack, trusting: Stack, trusted: bool
) -> None:
    """resource.url (and discovery's URL in the invoice) from the proxy's X-Forwarded-Proto
    and X-Forwarded-Host when the operator trusts one (xff_num_trusted_hops); a client's
    own are ignored otherwise (x402#636, #924)."""
    stack = trusting if trusted else edge
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "api.public.example"}
    challenge = send(stack, "GET", ATLAS, forwarded)
    assert challenge.status_code == 402
    url = protocol.decode_header(challenge.headers["payment-required"])["resource"]["url"]
    invoice = challenge.json()["x402"]["facilitator_url"]
    if trusted:
        assert url == "https://api.public.example" + ATLAS
        assert invoice == "https://api.public.example/.well-known/x402"
    else:
        assert url == f"http://127.0.0.1:{stack.ports['envoy']}{ATLAS}"
    # A forwarded host that is no plain host[:port] is never taken.
    odd = send(stack, "GET", ATLAS, {**forwarded, "x-forwarded-host": "evil.example/x?"})
    odd_url = protocol.decode_header(odd.headers["payment-required"])["resource"]["url"]
    assert "evil" not in odd_url


# -- 5. slow and oversized requests ----------------------------------------------------------


def test_a_client_dribbling_headers_is_cut_with_408(edge: Stack) -> None:
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, edge.ports["envoy"]), timeout=10) as client:
        client.sendall(b"GET " + FREE.encode() + b" HTTP/1.1\r\nHost: gw\r\n")
        answer = b""
        try:
            while time.monotonic() - started < 8:
                client.sendall(b"x-slow: 1\r\n")  # never the blank line that ends the headers
                client.settimeout(0.25)
                try:
                    chunk = client.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
        except ConnectionError:
            pass  # Envoy closed the connection after answering
        client.settimeout(2)
        try:
            while chunk := client.recv(4096):
                answer += chunk
        except OSError:
            pass
    elapsed = time.monotonic() - started

    assert 0.9 < elapsed < 6, elapsed
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "request_timeout"


def test_oversized_and_malformed_requests_get_the_envelope(edge: Stack) -> None:
    expect_envelope(send(edge, "GET", FREE, {"x-big": "a" * 70_000}), 431, "headers_too_large")

    with socket.create_connection((LOOPBACK, edge.ports["envoy"]), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nbad header: 1\r\n\r\n")
        answer = client.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert json.loads(body)["error"] == "bad_request"


def test_a_header_block_over_the_limit_is_answered_431_without_a_reset(edge: Stack) -> None:
    """A 70 KB header (the limit is 60 KiB): Envoy reads the whole block and answers 431 in
    the envelope, and the connection stays usable. Envoy's codec used to stop reading at
    the limit and close: the unread rest made the close a reset, which a client still
    sending (or a proxy in between) saw instead of the 431."""

    def answer(client: socket.socket) -> tuple[bytes, dict[str, Any]]:
        data = b""
        while b"\r\n\r\n" not in data:
            data += client.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += client.recv(65536)
        return head, json.loads(body)

    request = "GET {} HTTP/1.1\r\nHost: gw\r\n{}\r\n"
    with socket.create_connection((LOOPBACK, edge.ports["envoy"]), timeout=10) as client:
        client.sendall(request.format(FREE, f"x-big: {'a' * 70_000}\r\n").encode())
        head, body = answer(client)
        assert head.startswith(b"HTTP/1.1 431") and b"content-type: application/json" in head
        assert body["error"] == "headers_too_large"
        client.sendall(request.format(FREE, "").encode())  # the same connection, still open
        head, _ = answer(client)
        assert head.startswith(b"HTTP/1.1 200"), head


# -- 6. Envoy's own failures, and the sidecar's denials left alone ---------------------------


def test_the_sidecars_402_reaches_the_client_as_written(faults: Stack) -> None:
    challenge = send(faults, "GET", ATLAS)

    assert challenge.status_code == 402
    assert challenge.headers["content-type"] == "application/json"
    assert "payment-required" in challenge.headers and "retry-after" not in challenge.headers
    body = challenge.json()
    assert set(body) == {"error", "message", "x402"} and body["error"] == "payment_required"
    malformed = send(faults, "GET", ATLAS, {"x-payment": "%%%"})
    assert malformed.status_code == 400
    assert malformed.json()["error"] == "malformed_payment"


async def test_the_sidecars_ledger_unavailable_reaches_the_client_as_written(
    faults: Stack,
) -> None:
    wallet = Identity.generate()  # the ledger is never asked: it is down
    faults.processes["redis"].kill()
    try:
        through_envoy = send(faults, "GET", ATLAS, paid_headers(faults, wallet))
        status, body = ask_sidecar(faults, ATLAS, paid_headers(faults, wallet))
    finally:
        faults.start_redis()

    assert through_envoy.status_code == 503 == status
    assert through_envoy.content == body
    assert through_envoy.json()["error"] == "ledger_unavailable"
    assert through_envoy.headers["retry-after"] == "1"


def test_sidecar_down_is_503_authz_unavailable_and_the_stack_recovers(faults: Stack) -> None:
    sidecar = faults.processes["sidecar"].popen
    os.killpg(sidecar.pid, signal.SIGKILL)  # the supervisor and every worker
    sidecar.wait()
    try:
        for path in (ATLAS, FREE):  # free routes ask the sidecar too: fail closed
            down = send(faults, "GET", path)
            expect_envelope(down, 503, "authz_unavailable")
            assert down.headers["retry-after"] == "1"
    finally:
        faults.start_sidecar()
    assert send(faults, "GET", ATLAS).status_code == 402


def test_sidecar_hung_is_503_authz_unavailable_after_the_authz_timeout(faults: Stack) -> None:
    group = faults.processes["sidecar"].popen.pid  # its own session: workers included
    os.killpg(group, signal.SIGSTOP)
    try:
        started = time.monotonic()
        hung = send(faults, "GET", ATLAS)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(group, signal.SIGCONT)
    expect_envelope(hung, 503, "authz_unavailable")
    assert 0.9 < elapsed < 5, elapsed
    assert send(faults, "GET", ATLAS).status_code == 402


def test_upstream_down_is_503_upstream_unavailable(faults: Stack) -> None:
    faults.processes["upstream"].kill()
    try:
        down = send(faults, "GET", FREE)
    finally:
        faults.start_upstream()
    expect_envelope(down, 503, "upstream_unavailable")
    assert down.headers["retry-after"] == "1"
    assert send(faults, "GET", FREE).status_code == 200


def test_upstream_too_slow_is_504_upstream_timeout(faults: Stack) -> None:
    group = faults.processes["upstream"].popen.pid
    os.killpg(group, signal.SIGSTOP)
    try:
        slow = send(faults, "GET", FREE)
    finally:
        os.killpg(group, signal.SIGCONT)
    expect_envelope(slow, 504, "upstream_timeout")


def test_a_heap_over_max_heap_bytes_sheds_requests() -> None:
    """A heap limit far below Envoy's heap: every new request is refused, and the sidecar
    and the service are never asked. Envoy 1.40 sends this 503 before local_reply_config
    (plain text, no envelope): if this starts failing, the docs' exception can go."""
    with Stack(ROUTES, settings={"edge": {"max_heap_bytes": 1 << 20}}) as shedding:
        active = "overload.envoy.overload_actions.stop_accepting_requests.active"
        deadline = time.monotonic() + 10
        while shedding.envoy_counter(active) != 1:  # the monitor is read every 0.25 s
            assert time.monotonic() < deadline, "the overload manager never acted"
            time.sleep(0.05)
        shed = send(shedding, "GET", FREE)
        assert shed.status_code == 503
        assert (shed.headers["content-type"], shed.text) == ("text/plain", "envoy overloaded")
        assert shedding.decisions() == []
        assert [r for r in shedding.upstream_requests() if MARKER in r["headers"]] == []
