"""The HTTP ext_authz transport's own wire (server/authz/http_transport.py), whatever X402_TRANSPORT
says: Envoy's http_service mode in front of a real sidecar and Redis. The decisions behind
it are the end-to-end suite's, which runs over both transports (`make test`)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from sidecar.tools.stack import LOOPBACK, Stack
from tests.support.payers import funded_payer_at, pay_direct
from tests.support.routes import ROUTES

ATLAS = str(ROUTES["atlas"]["path"])  # GET, 0.25


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(ROUTES, transport="http") as running:
        yield running


def exchange(stack: Stack, raw: bytes, expect: int = 1) -> list[bytes]:
    """Send raw bytes to worker 0's HTTP check port; the answers read until `expect` came or
    the sidecar hung up."""
    answers: list[bytes] = []
    with socket.create_connection((LOOPBACK, stack.ports["authz_http"]), timeout=5) as conn:
        conn.sendall(raw)
        buffer = b""
        while len(answers) < expect:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(rest) < length:
                    break
                answers.append(head + b"\r\n\r\n" + rest[:length])
                buffer = rest[length:]
    return answers


def check(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: gw\r\n{extra}content-length: 0\r\n\r\n".encode()


def test_checks_share_one_connection_and_answer_in_order(stack: Stack) -> None:
    # Envoy keeps its connections to the sidecar alive; should it ever pipeline, each
    # check's answer still comes back in the order the checks went out.
    answers = exchange(stack, check(ATLAS) + check("/free") + check(ATLAS), expect=3)
    assert [a.split(b" ", 2)[1] for a in answers] == [b"402", b"200", b"402"]
    body = answers[0].partition(b"\r\n\r\n")[2]
    assert json.loads(body)["x402"]["resource"] == f"GET {ATLAS}"


def test_an_answer_to_head_has_no_body(stack: Stack) -> None:
    # Its content-length says what a GET's body would be; Envoy reads no body after it.
    received = b""
    with socket.create_connection((LOOPBACK, stack.ports["authz_http"]), timeout=5) as conn:
        conn.sendall(check(ATLAS, "HEAD") + check("/free"))
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"\r\n\r\n"):
            received += conn.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 402") and b"content-length: 0" not in head
    assert rest.startswith(b"HTTP/1.1 200")  # the next answer follows the head at once


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"get /x HTTP/1.1\r\nhost: gw\r\n\r\n",  # methods are upper case on this wire
        check(ATLAS, extra="x-pad: " + "a" * 70_000 + "\r\n"),  # over the header budget
    ],
    ids=["garbage", "lower-case-method", "huge-header"],
)
def test_what_is_not_envoys_http_is_refused_and_the_connection_closed(
    stack: Stack, raw: bytes
) -> None:
    answers = exchange(stack, raw + check("/free"), expect=2)
    assert len(answers) == 1, "the framing is lost: nothing after the refusal"
    assert answers[0].startswith(b"HTTP/1.1 400")
    assert json.loads(answers[0].partition(b"\r\n\r\n")[2])["error"] == "bad_request"


async def test_paid_through_envoy_over_http_reaches_the_service_with_the_facts(
    stack: Stack,
) -> None:
    wallet = await funded_payer_at(stack.redis_url, 1_000_000)
    headers = {**pay_direct(stack, wallet, f"GET {ATLAS}", "0.25"), "cookie": "secret=1"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        paid = await client.get(ATLAS, headers=headers)
    assert paid.status_code == 200
    seen = paid.json()
    assert seen["payer"] == wallet.public_key and seen["amount"] == "0.25"
    assert seen["proof_header_seen"] is False  # Envoy removed it on our instruction
    assert "x-payment-response" in paid.headers and "payer" not in paid.headers
    line = stack.wait_decisions(lambda d: d.get("receipt_id") == seen["receipt_id"])[-1]
    assert line["reason"] == "paid" and line["balance"] == "0.75"
    # The access log reads the receipt from ext_authz's dynamic metadata, as over gRPC.
    access = [
        json.loads(entry)
        for entry in stack.processes["envoy"].log().splitlines()
        if entry.startswith("{") and seen["receipt_id"] in entry
    ]
    assert access and access[0]["payer"] == wallet.public_key
