"""A retry on a route with a response phase is answered with the response it paid for
(docs/protocol.md §13, server/replays.py): through a real Envoy (ext_authz + ext_proc),
sidecar, Redis and the demo upstream, on both transports (X402_TRANSPORT=http)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from sidecar.core.decision import UPSTREAM_RECEIPT
from sidecar.core.identity import Identity
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.payers import b64json, funded_payer, pay_direct

REPORT, ROWS, SLOW = "/api/v1/report", "/api/v1/data/rows", "/api/v1/slow"
ROUTES: dict[str, dict[str, Any]] = {
    "report": {"method": "GET", "path": REPORT, "price": "0.25", "charge": "on_success"},
    "rows": {"method": "GET", "path": ROWS, "unit": "row", "unit_price": "0.001", "max_units": 100},
    "slow": {
        "method": "GET",
        "path": SLOW,
        "price": "0.25",
        "charge": "on_success",
        "hold_seconds": 3,
    },
}
BODY_MAX, PER_PAYER = 2048, 2  # small, so a test reaches both limits cheaply


@pytest.fixture(scope="module")
def replay_stack() -> Iterator[Stack]:
    settings = {"replay_body_max_bytes": BODY_MAX, "replay_per_payer": PER_PAYER}
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
async def replay_ledger(replay_stack: Stack) -> AsyncIterator[Ledger]:
    client = Ledger.from_url(replay_stack.redis_url)
    yield client
    await client.close()


@pytest.fixture
async def http(replay_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=replay_stack.url, timeout=15) as client:
        yield client


def served(stack: Stack, receipt_id: str) -> int:
    """How many requests with this receipt id reached the service."""
    return sum(
        1
        for entry in stack.upstream_requests()
        if entry["headers"].get(UPSTREAM_RECEIPT) == receipt_id
    )


def receipt_id(response: httpx.Response) -> str:
    return str(b64json(response.headers["payment-response"])["receipt_id"])


async def debited(ledger: Ledger, wallet: Identity) -> int:
    return (await ledger.account(wallet.public_key)).debited.get("USDF", 0)


async def lost_answer(
    stack: Stack, ledger: Ledger, wallet: Identity, target: str, proof: str
) -> None:
    """The agent sends the paid request and never reads the answer: its connection drops
    once the response was captured (charged), as a lost answer would."""
    url = urlsplit(stack.url)
    assert url.hostname is not None and url.port is not None
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Payment: {proof}\r\n\r\n".encode())
    await writer.drain()
    for _ in range(250):
        if await debited(ledger, wallet):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the response was never captured")
    writer.close()
    await writer.wait_closed()


async def test_a_lost_answer_is_replayed_and_the_service_runs_once(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {REPORT}", "0.25")
    await lost_answer(replay_stack, replay_ledger, wallet, REPORT, headers["X-Payment"])

    again = await http.get(REPORT, headers=headers)

    assert again.status_code == 200, again.text
    first = again.json()  # the body the service wrote for the first request
    assert first["path"] == REPORT and first["payer"] == wallet.public_key
    assert again.headers["content-type"] == "application/json"
    rid = receipt_id(again)
    assert first["receipt_id"] == rid
    assert served(replay_stack, rid) == 1
    assert await debited(replay_ledger, wallet) == 250_000
    assert len(await replay_ledger.receipts(wallet.public_key)) == 1
    [line] = replay_stack.wait_decisions(
        lambda d: d.get("payer") == wallet.public_key and d.get("reason") == "replayed"
    )
    assert line["receipt_id"] == rid


async def test_a_metered_response_is_replayed_without_its_usage_header(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {ROWS}", "0.1")
    first = await http.get(ROWS, params={"limit": "7"}, headers=headers)
    again = await http.get(ROWS, params={"limit": "7"}, headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.content == first.content and len(again.json()["rows"]) == 7
    assert "x402-usage" not in again.headers
    assert receipt_id(again) == receipt_id(first)
    assert b64json(again.headers["payment-response"])["units"] == 7
    assert served(replay_stack, receipt_id(first)) == 1
    assert await debited(replay_ledger, wallet) == 7_000


async def test_a_body_over_the_limit_is_redelivered_instead(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    """rows?limit=100 is larger than replay_body_max_bytes: not kept, the retry passes
    again (the service runs again), charged nothing, with the same receipt id."""
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {ROWS}", "0.1")
    first = await http.get(ROWS, params={"limit": "100"}, headers=headers)
    assert len(first.content) > BODY_MAX
    again = await http.get(ROWS, params={"limit": "100"}, headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["receipt_id"] == receipt_id(first) == receipt_id(again)
    assert served(replay_stack, receipt_id(first)) == 2
    assert await debited(replay_ledger, wallet) == 100_000


async def test_a_payer_keeps_at_most_its_bound_of_responses(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    """replay_per_payer responses kept at once; past it the payment's retry is redelivered."""
    wallet = await funded_payer(replay_ledger, 1_000_000)
    proofs = [pay_direct(replay_stack, wallet, f"GET {REPORT}", "0.25") for _ in range(3)]
    firsts = [await http.get(REPORT, headers=proof) for proof in proofs]
    agains = [await http.get(REPORT, headers=proof) for proof in proofs]

    assert [a.status_code for a in agains] == [200, 200, 200]
    seen = [served(replay_stack, receipt_id(first)) for first in firsts]
    assert seen == [1, 1, 2]  # the third was not kept: redelivered
    kept = keyspace.replays(wallet.public_key)
    assert await replay_ledger.call(replay_ledger._redis.zcard(kept)) == PER_PAYER
    assert await debited(replay_ledger, wallet) == 3 * 250_000


async def test_one_proof_sent_a_hundred_times_is_answered_at_most_the_limit(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {REPORT}", "0.25")
    first = await http.get(REPORT, headers=headers)
    answers = [await http.get(REPORT, headers=headers) for _ in range(100)]

    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * DEFAULT_REDELIVERY_LIMIT + [402] * (100 - DEFAULT_REDELIVERY_LIMIT)
    assert answers[-1].json()["error"] == "nonce_reused"
    assert all(a.content == first.content for a in answers[:DEFAULT_REDELIVERY_LIMIT])
    assert served(replay_stack, receipt_id(first)) == 1
    assert await debited(replay_ledger, wallet) == 250_000


async def test_a_service_error_or_redirect_it_was_charged_for_is_replayed_as_it_was(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    """Statuses below the route's failure_status are captured, so kept: the retry gets
    the same status, body and Location, over either transport."""
    wallet = await funded_payer(replay_ledger, 1_000_000)
    for params in ({"fail": "404"}, {"redirect": "/elsewhere"}):
        headers = pay_direct(replay_stack, wallet, f"GET {REPORT}", "0.25")
        first = await http.get(REPORT, params=params, headers=headers)
        again = await http.get(REPORT, params=params, headers=headers)

        assert first.status_code in (404, 302)
        assert (again.status_code, again.content) == (first.status_code, first.content)
        assert again.headers.get("location") == first.headers.get("location")
        assert served(replay_stack, receipt_id(first)) == 1
    assert await debited(replay_ledger, wallet) == 2 * 250_000


async def test_a_body_larger_than_envoys_buffer_is_served_whole_and_not_kept(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    """Envoy shows the sidecar only its buffer's worth of a large body: the capture
    happens on it (the receipt on the response), the client gets every byte, and the
    retry is redelivered."""
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {ROWS}", "0.1")
    first = await http.get(ROWS, params={"limit": "4000"}, headers=headers)
    again = await http.get(ROWS, params={"limit": "4000"}, headers=headers)

    assert (first.status_code, again.status_code) == (200, 200)
    assert len(first.content) > 64 * 1024 and len(first.json()["rows"]) == 4000
    assert b64json(first.headers["payment-response"])["units"] == 100  # max_units
    assert receipt_id(again) == receipt_id(first)
    assert served(replay_stack, receipt_id(first)) == 2
    assert await debited(replay_ledger, wallet) == 100_000


async def test_a_retry_while_its_hold_is_open_is_told_to_resend_and_is_charged_once(
    http: httpx.AsyncClient, replay_stack: Stack, replay_ledger: Ledger
) -> None:
    """The agent hangs up while the service works (before any answer): its proof's hold is
    open, nothing charged yet. The same proof sent meanwhile is `503 payment_in_progress`
    (not `nonce_reused`: nothing was charged), and sent again after Retry-After it ends
    served once: the recorded answer if the response was captured, else (the hold
    released) the proof pays anew. One charge either way."""
    wallet = await funded_payer(replay_ledger, 1_000_000)
    headers = pay_direct(replay_stack, wallet, f"GET {SLOW}", "0.25")
    url = urlsplit(replay_stack.url)
    assert url.hostname is not None and url.port is not None
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    proof = headers["X-Payment"]
    writer.write(f"GET {SLOW}?sleep=1 HTTP/1.1\r\nHost: x\r\nX-Payment: {proof}\r\n\r\n".encode())
    await writer.drain()
    for _ in range(250):  # the hold is placed; the service dawdles
        if (await replay_ledger.account(wallet.public_key)).held:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("no hold was placed")
    writer.close()
    await writer.wait_closed()

    waiting = await http.get(SLOW, params={"sleep": "1"}, headers=headers)

    assert waiting.status_code == 503, waiting.text
    assert waiting.json()["error"] == "payment_in_progress"
    assert waiting.json()["receipt_id"].startswith("rcpt_")
    assert waiting.headers["retry-after"] == "1"
    for _ in range(100):  # the SDK's loop: the same proof after Retry-After
        answer = await http.get(SLOW, params={"sleep": "1"}, headers=headers)
        if answer.status_code != 503:
            break
        await asyncio.sleep(0.1)
    assert answer.status_code == 200, answer.text
    assert await debited(replay_ledger, wallet) == 250_000
    assert len(await replay_ledger.receipts(wallet.public_key)) == 1
