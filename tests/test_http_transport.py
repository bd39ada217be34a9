"""The HTTP transport's own wire (server/authz/http_transport.py, and the response phase's,
server/processing/http_transport.py), whatever X402_TRANSPORT says: Envoy's http_service
and its Lua filter's call in front of a real sidecar and Redis. The decisions behind it are
the end-to-end suite's, which runs over both transports (`make test`)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from sidecar.core import phases
from sidecar.ledger.accounts import Ledger
from sidecar.server.envoy import contract, phase_call
from sidecar.tools.stack import LOOPBACK, Stack
from tests.support.payers import funded_payer_at, pay_direct
from tests.support.routes import ROUTES

ATLAS = str(ROUTES["atlas"]["path"])  # GET, 0.25
REPORT = "/api/v1/report"  # GET, 0.25, charged on success: the response phase runs
HELD_ROUTES = {
    **ROUTES,
    "report": {"method": "GET", "path": REPORT, "price": "0.25", "charge": "on_success"},
}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A held route: its response phase goes over HTTP too (server/envoy/phase_call.py)."""
    with Stack(HELD_ROUTES, transport="http") as running:
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


# -- The response phase over HTTP (the Lua filter's call) --------------------------------


def process(
    metadata: dict[str, str] | None,
    status: int | None = 200,
    body: bytes | None = None,
    timeout_ms: int = 1000,
    mark: bool = True,
) -> bytes:
    """The phase's POST as Envoy's Lua filter writes it (server/envoy/phase_call.py), to the
    checks' port: the check's metadata and the response's status as headers, the body when
    the filter read it whole."""
    lines = [f"POST {contract.PROCESS_PATH} HTTP/1.1", "host: x402"]
    if mark:
        lines.append(f"{contract.PROCESS_HEADER}: {phases.PHASE_RESPONSE}")
    lines.append(f"{contract.TIMEOUT_HEADER}: {timeout_ms}")
    lines += [f"{contract.META_PREFIX}{key}: {value}" for key, value in (metadata or {}).items()]
    if status is not None:
        lines.append(f"{contract.STATUS_HEADER}: {status}")
    lines.append(f"{contract.RESPONSE_PREFIX}content-type: application/json")
    if body is not None:
        lines.append(f"{contract.BODY_HEADER}: {contract.WHOLE_BODY}")
    lines.append(f"content-length: {len(body or b'')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def answer_of(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The sidecar's answer: its status, its headers, its body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ", 2)[1]), headers, body


def held_check(stack: Stack, proof: dict[str, str]) -> dict[str, str]:
    """A check on the held route over the wire, as Envoy sends it; the hold's metadata
    its answer carries (Envoy's dynamic_metadata_from_headers)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in proof.items())
    extra += f"{contract.PHASE_HEADER}: {phases.PHASE_RESPONSE}\r\n"
    extra += f"{contract.TIMEOUT_HEADER}: 1000\r\n"
    [answer] = exchange(stack, check(REPORT, extra=extra))
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200"), head
    fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    return {key: fields[key] for key in contract.METADATA_KEYS if key in fields}


def test_envoy_asks_the_response_phase_over_http_on_the_checks_port(stack: Stack) -> None:
    """The held route's phase is the Lua filter's call to the checks' cluster; no ext_proc
    (no MCP route here), so nothing of the phase goes over gRPC."""
    config = (stack.dir / "envoy.yaml").read_text()
    assert phase_call.NAME in config and contract.PROCESS_PATH in config
    assert "x402_authz_http" in config
    assert "ext_proc.v3.ExternalProcessor" not in config


async def test_a_held_request_through_envoy_is_captured_over_http(stack: Stack) -> None:
    wallet = await funded_payer_at(stack.redis_url, 1_000_000)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        served = await client.get(
            REPORT, headers=pay_direct(stack, wallet, f"GET {REPORT}", "0.25")
        )
    assert served.status_code == 200
    receipt = json.loads(base64.b64decode(served.headers["payment-response"]))
    assert receipt["success"] is True and receipt["amount"] == "0.25"
    [line] = stack.wait_decisions(
        lambda d: d.get("phase") == "response" and d.get("receipt_id") == receipt["receipt_id"]
    )
    assert line["decision"] == "capture" and line["upstream_status"] == 200


async def test_a_phase_past_envoys_deadline_never_charges_and_a_timely_one_captures_once(
    stack: Stack,
) -> None:
    """Envoy gave up on the phase (its deadline, carried on the POST, has passed): the
    capture script refuses, the answer replaces the response (never served free), the hold
    stays. The same hold's phase in time captures it, once, and keeps its body."""
    wallet = await funded_payer_at(stack.redis_url, 1_000_000)
    metadata = held_check(stack, pay_direct(stack, wallet, f"GET {REPORT}", "0.25"))
    assert contract.HOLD in metadata
    [late] = exchange(stack, process(metadata, body=b'{"late": 1}', timeout_ms=0))
    status, headers, body = answer_of(late)
    assert status == 200 and headers[contract.REPLACE_HEADER] == "503"
    assert json.loads(body)["error"] == "ledger_unavailable"
    ledger = Ledger.from_url(stack.redis_url)
    try:
        account = await ledger.account(wallet.public_key)
        assert (account.balances["USDF"], account.held["USDF"]) == (750_000, 250_000)
        [timely] = exchange(stack, process(metadata, body=b'{"report": 1}'))
        status, headers, body = answer_of(timely)
        assert status == 200 and contract.REPLACE_HEADER not in headers and body == b""
        encoded = headers[contract.SET_PREFIX + "payment-response"]
        receipt = json.loads(base64.b64decode(encoded))
        assert receipt["amount"] == "0.25" and receipt["receipt_id"] == metadata[contract.HOLD]
        account = await ledger.account(wallet.public_key)
        assert (account.balances["USDF"], account.held) == (750_000, {})
        assert len(await ledger.receipts(wallet.public_key)) == 1
    finally:
        await ledger.close()


def test_a_free_or_unmarked_call_continues_and_what_is_not_envoys_fails_the_phase(
    stack: Stack,
) -> None:
    [free] = exchange(stack, process(None))  # no metadata: a free response goes on as it is
    assert answer_of(free) == (200, {"content-length": "0"}, b"")
    # Without the response's status the call is not Envoy's: a 400, which the filter takes
    # for the phase's failure (its 503).
    [refused] = exchange(stack, process({contract.HOLD: "r1"}, status=None))
    assert refused.startswith(b"HTTP/1.1 400")
    # The same path without Envoy's mark is a client request's check, never the phase.
    [checked] = exchange(stack, process(None, mark=False))
    assert contract.REMOVE_HEADER in answer_of(checked)[1]  # a check's allow: a free path


def test_an_mcp_answer_the_phase_never_saw_fails_closed(stack: Stack) -> None:
    """An MCP route's phase needs the tool's answer (the renderer puts such routes on
    gRPC): asked over HTTP about a held call without its body, the sidecar replaces the
    response (a 503), never serving it free."""
    metadata = {contract.MCP: contract.MCP_CALL, contract.HOLD: "r1", contract.HELD: "250000"}
    [answer] = exchange(stack, process(metadata))
    status, headers, _ = answer_of(answer)
    assert status == 200 and headers[contract.REPLACE_HEADER] == "503"
