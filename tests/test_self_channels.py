"""Self-serve channels through the real stack (Envoy, the sidecar, Redis; anvil and the
official facilitator for the top-up): a fresh key buys credit with `exact`, opens its own
channel from it, streams vouchered requests and closes it, with nobody else acting; every
refusal is typed and moves nothing; replays and concurrent opens never overdraw."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest

from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.evm import EvmKey
from sidecar.agent.topup import atopup
from sidecar.agent.wallet import Wallet
from sidecar.core import channel_requests, protocol, vouchers
from sidecar.core.errors import ChannelRequestFailed
from sidecar.core.identity import Identity
from sidecar.core.receipts import Receipt
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import SUSPENDED, Ledger
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, exact_settings
from sidecar.tools.stack import Stack
from tests.support.cli import x402
from tests.support.payers import conserved, funded_payer
from tests.support.streams import raw, xrange

OPEN, CLOSE = "/x402/channel/open", "/x402/channel/close"
CHEAP = "/api/cheap"
ROUTES = {"cheap": {"method": "GET", "path": CHEAP, "price": "0.001"}}
USDF = 1_000_000
CHANNELS = {"min_deposit": "0.5", "max_deposit": "20", "max_ttl_seconds": 7200}


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    settings = exact_settings(chain, facilitator, channels=CHANNELS)
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.fixture
async def ledger(stack: Stack) -> AsyncIterator[Ledger]:
    client = Ledger.from_url(stack.redis_url)
    yield client
    await client.close()


def keys(stack: Stack) -> dict[str, str]:
    return {stack.gateway_identity.kid: stack.gateway_identity.public_key}


def signed(stack: Stack, wallet: Identity, **changes: Any) -> dict[str, Any]:
    """A signed open request (or close, with action="close"), `changes` applied first."""
    terms: dict[str, Any] = {
        "action": "open",
        "channel_id": vouchers.new_channel_id(),
        "asset": "USDF",
        "deposit": "1",
        "ttl_seconds": 3600,
        "payee": stack.gateway_identity.kid,
        "nonce": protocol.new_nonce(),
        "expires_at": int(time.time()) + 60,
        **changes,
    }
    if terms["action"] == "close":
        terms = {k: v for k, v in terms.items() if k not in ("asset", "deposit", "ttl_seconds")}
    return channel_requests.sign_request(terms, wallet)


async def send(http: httpx.AsyncClient, path: str, request: dict[str, Any]) -> httpx.Response:
    header = {channel_requests.HEADER: protocol.encode_header(request)}
    return await http.post(path, headers=header)


async def state(ledger: Ledger, payer: str) -> tuple[dict[str, str], set[str]]:
    """Everything of the payer a channel request could move: its account, its channels."""
    account = await raw(ledger).hgetall(keyspace.account(payer))
    channels = await raw(ledger).smembers(keyspace.channels(payer))
    return cast(dict[str, str], account), cast(set[str], channels)


async def test_discovery_lists_self_serve_channels(http: httpx.AsyncClient) -> None:
    doc = (await http.get(protocol.DISCOVERY_PATH)).json()
    assert doc["channels"] == {
        "open": {"method": "POST", "path": OPEN},
        "close": {"method": "POST", "path": CLOSE},
        "asset": "USDF",
        "min_deposit": "0.5",
        "max_deposit": "20",
        "max_ttl_seconds": 7200,
    }


async def test_a_fresh_key_tops_up_opens_streams_a_thousand_and_closes(
    stack: Stack, chain: AnvilChain, ledger: Ledger
) -> None:
    """Nobody but the agent acts: its top-up (exact), its open, 1,000 vouchers, its close."""
    account = EvmKey.generate()
    chain.mint(account.address, 10 * USDF)
    wallet = Wallet(Identity.generate(), evm=account)
    payer = wallet.public_key
    done = await atopup(stack.url, wallet, "5", strict=True)
    assert done.credited == "5"
    assert await conserved(ledger, payer) == {
        "credited": 5 * USDF, "balance": 5 * USDF, "channeled": 0, "debited": 0,
    }  # fmt: skip

    channel = await PaymentChannel.aopen(stack.url, wallet, "2", ttl_seconds=600)
    opened = channel.opened
    assert opened is not None and opened.receipt.verify(keys(stack))
    assert (opened.deposit, opened.balance, opened.receipt.body["kind"]) == (
        "2",
        "3",
        "channel_open",
    )
    assert 595 <= opened.expires_at - int(time.time()) <= 600
    assert await conserved(ledger, payer) == {
        "credited": 5 * USDF, "balance": 3 * USDF, "channeled": 2 * USDF, "debited": 0,
    }  # fmt: skip

    auth = ChannelAuth(channel, strict=True)
    async with httpx.AsyncClient(base_url=stack.url, auth=auth, timeout=10) as agent:
        for n in range(1000):
            response = await agent.get(CHEAP)
            assert response.status_code == 200, response.text
            if n % 100 == 99:  # the deposit is locked while the channel streams
                assert await conserved(ledger, payer) == {
                    "credited": 5 * USDF, "balance": 3 * USDF, "channeled": 2 * USDF,
                    "debited": 0,
                }  # fmt: skip
    assert channel.cumulative == "1"

    closed = await channel.aclose()
    assert (closed.spent, closed.refund, closed.balance, closed.already_closed) == (
        "1",
        "1",
        "4",
        False,
    )
    assert closed.receipt.verify(keys(stack))
    assert closed.receipt.body["voucher"]["sequence"] == 1000  # the payer's own signature
    assert vouchers.verify_signature(closed.receipt.body["voucher"])
    assert await conserved(ledger, payer) == {
        "credited": 5 * USDF, "balance": 4 * USDF, "channeled": 0, "debited": 1 * USDF,
    }  # fmt: skip
    # The close receipt is the one settlement batches: the same bytes from the stream.
    (entry,) = [
        fields
        for _id, fields in await xrange(raw(ledger), keyspace.receipts(payer))
        if fields.get("kind") == "channel"
    ]
    assert entry["receipt_id"] == closed.receipt.receipt_id

    again = await channel.aclose()  # closing twice moves nothing, answers the same close
    assert again.already_closed and again.receipt == closed.receipt
    assert await raw(ledger).hget(keyspace.account(payer), "balance:USDF") == str(4 * USDF)
    # The agent's own requests, and no operator: this stack serves no admin API at all.
    decisions = [line for line in log_lines(stack) if line.get("event") == "channel.decision"]
    mine = [(d["action"], d["decision"]) for d in decisions if d["payer"] == payer]
    assert mine == [("open", "allow"), ("close", "allow"), ("close", "allow")]
    assert any(line.get("event") == "admin.disabled" for line in log_lines(stack))


def log_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for text in stack.processes["sidecar"].log().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def test_the_sync_sdk_opens_and_closes(stack: Stack) -> None:
    identity = asyncio.run(_funded(stack, 3 * USDF))
    wallet = Wallet(identity)
    channel = PaymentChannel.open(stack.url, wallet, "2")
    with httpx.Client(base_url=stack.url, auth=ChannelAuth(channel, strict=True)) as agent:
        assert agent.get(CHEAP).status_code == 200
    closed = channel.close()
    assert (closed.spent, closed.refund, closed.balance) == ("0.001", "1.999", "2.999")
    assert asyncio.run(stack.balance(identity.public_key)) == 2_999_000


async def _funded(stack: Stack, amount: int) -> Identity:
    ledger = Ledger.from_url(stack.redis_url)
    try:
        return await funded_payer(ledger, amount)
    finally:
        await ledger.close()


async def test_refusals_are_typed_and_move_nothing(
    stack: Stack, http: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 3 * USDF)
    payer = wallet.public_key
    stale = int(time.time()) - 1
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (OPEN, signed(stack, wallet, deposit="4"), 402, "insufficient_funds"),
        (OPEN, signed(stack, wallet, deposit="0.4"), 400, "bad_request"),  # under min
        (OPEN, signed(stack, wallet, deposit="21"), 400, "bad_request"),  # over max
        (OPEN, signed(stack, wallet, deposit="1.0000001"), 400, "bad_request"),
        (OPEN, signed(stack, wallet, ttl_seconds=7201), 400, "bad_request"),
        (OPEN, signed(stack, wallet, asset="EURF"), 400, "bad_request"),
        (OPEN, signed(stack, wallet, expires_at=stale), 402, "invoice_expired"),
        (OPEN, signed(stack, wallet, expires_at=int(time.time()) + 3600), 402, "invoice_expired"),
        (OPEN, signed(stack, wallet, payee="gw_elsewhere"), 402, "invoice_mismatch"),
        (OPEN, {**signed(stack, wallet), "deposit": "2"}, 402, "invalid_signature"),
        (OPEN, signed(stack, wallet, action="close"), 400, "bad_request"),  # wrong path
        (CLOSE, signed(stack, wallet, action="close"), 402, "unknown_channel"),
        (OPEN, {"version": "fth-x402/2.0"}, 400, "malformed_payment"),
    ]
    before = await state(ledger, payer)
    for path, request, status, reason in cases:
        response = await send(http, path, request)
        assert (response.status_code, response.json()["error"]) == (status, reason), request
        assert await state(ledger, payer) == before, reason
    over = (await send(http, OPEN, signed(stack, wallet, deposit="4"))).json()
    assert over["balance"] == 3 * USDF
    under = (await send(http, OPEN, signed(stack, wallet, deposit="0.4"))).json()
    assert (under["min"], under["max"]) == ("0.5", "20")
    no_header = await http.post(OPEN)
    assert (no_header.status_code, no_header.json()["error"]) == (400, "bad_request")
    not_post = await http.get(OPEN, headers={channel_requests.HEADER: "x"})
    assert (not_post.status_code, not_post.json()["error"]) == (400, "bad_request")

    stranger = Identity.generate()  # never credited: no account
    response = await send(http, OPEN, signed(stack, stranger))
    assert (response.status_code, response.json()["error"]) == (402, "unknown_payer")
    assert await state(ledger, stranger.public_key) == ({}, set())

    suspended = await funded_payer(ledger, 3 * USDF)
    await ledger.set_status(suspended.public_key, SUSPENDED)
    held = await state(ledger, suspended.public_key)
    response = await send(http, OPEN, signed(stack, suspended))
    assert (response.status_code, response.json()["error"]) == (403, "payer_suspended")
    assert await state(ledger, suspended.public_key) == held


async def test_a_replayed_open_or_close_moves_nothing(
    stack: Stack, http: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 3 * USDF)
    payer = wallet.public_key
    request = signed(stack, wallet, deposit="1")
    first = await send(http, OPEN, request)
    assert first.status_code == 200, first.text
    assert Receipt.from_wire(first.json()["receipt"]).verify(keys(stack))
    after = await state(ledger, payer)
    replays = await asyncio.gather(*(send(http, OPEN, request) for _ in range(5)))
    assert {(r.status_code, r.json()["error"]) for r in replays} == {(402, "nonce_reused")}
    assert await state(ledger, payer) == after
    # The same terms under a fresh nonce, same channel id: refused, not a second deposit.
    same_id = signed(stack, wallet, channel_id=request["channel_id"])
    response = await send(http, OPEN, same_id)
    assert (response.status_code, response.json()["error"]) == (409, "channel_exists")
    assert await state(ledger, payer) == after

    close = signed(stack, wallet, action="close", channel_id=request["channel_id"])
    closed = await send(http, CLOSE, close)
    assert closed.status_code == 200, closed.text
    assert closed.json()["refund"] == "1"
    after_close = await state(ledger, payer)
    replayed = await send(http, CLOSE, close)
    assert (replayed.status_code, replayed.json()["error"]) == (402, "nonce_reused")
    assert await state(ledger, payer) == after_close
    assert await conserved(ledger, payer) == {
        "credited": 3 * USDF, "balance": 3 * USDF, "channeled": 0, "debited": 0,
    }  # fmt: skip


async def test_concurrent_opens_from_one_payer_never_overdraw(
    stack: Stack, http: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 10 * USDF)
    payer = wallet.public_key
    requests = [signed(stack, wallet, deposit="1") for _ in range(25)]
    answers = await asyncio.gather(*(send(http, OPEN, request) for request in requests))
    outcomes = sorted((r.status_code, r.json().get("error", "")) for r in answers)
    assert outcomes == [(200, "")] * 10 + [(402, "insufficient_funds")] * 15
    assert await conserved(ledger, payer) == {
        "credited": 10 * USDF, "balance": 0, "channeled": 10 * USDF, "debited": 0,
    }  # fmt: skip
    assert len(await raw(ledger).smembers(keyspace.channels(payer))) == 10


async def test_the_cli_opens_and_closes_its_own_channel(
    stack: Stack, ledger: Ledger, tmp_path: Any
) -> None:
    wallet = await funded_payer(ledger, 2 * USDF)
    key_file = tmp_path / "agent.key"
    wallet.save(key_file)
    run = await x402("channel", "open", "--self", stack.url, "1.5", "--wallet", str(key_file))
    assert run.code == 0, run.err
    assert "deposit 1.5 USDF" in run.out and "balance left 0.5 USDF" in run.out
    channel_id = run.out.split()[1]
    closed = await x402(
        "channel", "close", "--self", stack.url, channel_id, "--wallet", str(key_file)
    )
    assert closed.code == 0, closed.err
    assert "refunded 1.5; balance 2 USDF" in closed.out
    assert await conserved(ledger, wallet.public_key) == {
        "credited": 2 * USDF, "balance": 2 * USDF, "channeled": 0, "debited": 0,
    }  # fmt: skip


async def test_a_refused_sdk_open_says_why(stack: Stack, ledger: Ledger) -> None:
    wallet = Wallet(await funded_payer(ledger, USDF))
    with pytest.raises(ChannelRequestFailed) as refused:
        await PaymentChannel.aopen(stack.url, wallet, "2")
    assert (refused.value.reason, refused.value.status) == ("insufficient_funds", 402)
