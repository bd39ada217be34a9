"""State channels end to end: open (CLI), 1,000 vouchered requests through real Envoy with
the SDK's ChannelAuth, stale and replayed vouchers refused, close; money conserved."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol, vouchers
from sidecar.core.errors import ChannelExhausted
from sidecar.core.identity import Identity
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import SUSPENDED, Ledger
from sidecar.ledger.channels import Channels
from sidecar.server.authz.check import CheckService
from sidecar.server.config import Settings
from sidecar.server.logs import DecisionLog
from sidecar.tools.stack import Stack
from tests.support.cli import x402
from tests.support.inprocess import cancel_while_redis_stalls
from tests.support.payers import b64json, conserved, funded_payer, voucher_header
from tests.support.routes import VERIFY
from tests.support.settlement import settle
from tests.support.streams import raw, xrange

USDF = 1_000_000


async def open_channel(stack: Stack, payer: str, deposit: str) -> str:
    run = await x402("channel", "open", payer, deposit, "--config", str(stack.config_path))
    assert run.code == 0, run.err
    match = re.search(r"channel (ch_[\w-]+)", run.out)
    assert match, run.out
    return match.group(1)


async def open_fast(ledger: Ledger, stack: Stack, payer: str, deposit: int) -> str:
    """In-process, for the tests that are not about the CLI (a process costs ~0.5 s)."""
    channel_id, _balance = await Channels(ledger).open(
        payer, "USDF", deposit, stack.gateway_identity.kid
    )
    return channel_id


async def expect(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == reason
    return body


async def test_open_a_thousand_vouchered_requests_and_close(
    stack: Stack, ledger: Ledger, client: httpx.AsyncClient
) -> None:
    wallet = await funded_payer(ledger, 15 * USDF)
    payer = wallet.public_key
    channel_id = await open_channel(stack, payer, "12")
    assert await conserved(ledger, payer) == {
        "credited": 15 * USDF,
        "balance": 3 * USDF,
        "channeled": 12 * USDF,
        "debited": 0,
    }
    lane = PaymentChannel(Wallet(wallet), channel_id, deposit="12")

    async with httpx.AsyncClient(
        base_url=stack.url, auth=ChannelAuth(lane, strict=True), timeout=10
    ) as agent:
        for n in range(1000):
            response = await agent.get(VERIFY.format(n=n % 7))
            assert response.status_code == 200, response.text

    receipt = b64json(response.headers["x-payment-response"])
    assert protocol.verify_receipt(
        receipt, {stack.gateway_identity.kid: stack.gateway_identity.public_key}
    )
    assert (receipt["scheme"], receipt["channel_id"], receipt["sequence"]) == (
        "channel-ed25519",
        channel_id,
        1000,
    )
    assert (receipt["cumulative"], receipt["amount"], receipt["balance"]) == ("10", "0.01", "2")
    assert response.json()["amount"] == "0.01"  # what the upstream was told
    state = await Channels(ledger).get(payer, channel_id)
    assert (state.cumulative, state.sequence, state.status) == (10 * USDF, 1000, "open")
    assert lane.spent == "10"
    # Vouchers write no per-request record: the channel's last voucher is its whole state.
    assert await raw(ledger).xlen(keyspace.receipts(payer)) == 0
    await conserved(ledger, payer)

    # The last voucher again: a lost answer's retry is redelivered with its first receipt;
    # past the limit, or for another request, or an older one: refused. Nothing moves.
    last = voucher_header(
        stack,
        wallet,
        channel_id=channel_id,
        cumulative="10",
        sequence=1000,
        resource=f"GET {VERIFY.format(n=5)}",
    )
    retried = [await client.get(VERIFY.format(n=5), headers=last) for _ in range(3)]
    assert {(r.status_code, r.headers["x-payment-response"]) for r in retried} == {
        (200, response.headers["x-payment-response"])
    }
    other = await client.get(VERIFY.format(n=5), params={"q": "other"}, headers=last)
    assert (other.status_code, other.json()["error"]) == (409, "payment_identifier_conflict")
    body = await expect(await client.get(VERIFY.format(n=5), headers=last), 402, "stale_voucher")
    assert (body["sequence"], body["cumulative"]) == (1000, "10")
    older = voucher_header(
        stack,
        wallet,
        channel_id=channel_id,
        cumulative="5",
        sequence=500,
        resource=f"GET {VERIFY.format(n=1)}",
    )
    await expect(await client.get(VERIFY.format(n=1), headers=older), 402, "stale_voucher")
    # Raised by less than the price; beyond the deposit.
    cheap = voucher_header(
        stack,
        wallet,
        channel_id=channel_id,
        cumulative="10.005",
        sequence=1001,
        resource=f"GET {VERIFY.format(n=1)}",
    )
    await expect(await client.get(VERIFY.format(n=1), headers=cheap), 402, "underpaid_voucher")
    greedy = voucher_header(
        stack,
        wallet,
        channel_id=channel_id,
        cumulative="12.01",
        sequence=1001,
        resource=f"GET {VERIFY.format(n=1)}",
    )
    body = await expect(
        await client.get(VERIFY.format(n=1), headers=greedy), 402, "insufficient_funds"
    )
    assert body["balance"] == "2"  # left in the channel
    state = await Channels(ledger).get(payer, channel_id)
    assert (state.cumulative, state.sequence) == (10 * USDF, 1000)

    run = await x402("channel", "close", payer, channel_id, "--config", str(stack.config_path))

    assert run.code == 0, run.err
    assert "spent 10 in 1000 vouchers, refunded 2; balance 5" in run.out
    assert await conserved(ledger, payer) == {
        "credited": 15 * USDF,
        "balance": 5 * USDF,
        "channeled": 0,
        "debited": 10 * USDF,
    }
    # Closing again moves nothing; a voucher after the close is refused.
    again = await x402("channel", "close", payer, channel_id, "--config", str(stack.config_path))
    assert "was already closed" in again.out
    assert (await conserved(ledger, payer))["balance"] == 5 * USDF
    late = voucher_header(
        stack,
        wallet,
        channel_id=channel_id,
        cumulative="10.01",
        sequence=1001,
        resource=f"GET {VERIFY.format(n=1)}",
    )
    await expect(await client.get(VERIFY.format(n=1), headers=late), 402, "channel_closed")
    # The close is one receipt in the stream, carrying the payer's final voucher.
    [(_id, entry)] = await xrange(raw(ledger), keyspace.receipts(payer))
    assert (entry["kind"], entry["amount"], entry["refund"], entry["sequence"]) == (
        "channel",
        str(10 * USDF),
        str(2 * USDF),
        "1000",
    )
    final = json.loads(entry["voucher"])
    assert final["sequence"] == 1000 and final["cumulative"] == "10"
    assert vouchers.verify_signature(final)


async def test_only_one_of_many_copies_of_a_voucher_is_accepted(
    stack: Stack, ledger: Ledger, client: httpx.AsyncClient
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_fast(ledger, stack, wallet.public_key, USDF)
    path = VERIFY.format(n=1)
    headers = voucher_header(
        stack, wallet, channel_id=channel_id, cumulative="0.01", sequence=1, resource=f"GET {path}"
    )

    responses = await asyncio.gather(*(client.get(path, headers=headers) for _ in range(30)))

    statuses = [r.status_code for r in responses]  # one charge, the limit's redeliveries
    assert statuses.count(200) == 1 + DEFAULT_REDELIVERY_LIMIT
    assert statuses.count(402) == 29 - DEFAULT_REDELIVERY_LIMIT
    assert len({r.json()["receipt_id"] for r in responses if r.status_code == 200}) == 1
    assert {r.json()["error"] for r in responses if r.status_code == 402} == {"stale_voucher"}
    state = await Channels(ledger).get(wallet.public_key, channel_id)
    assert (state.cumulative, state.sequence) == (10_000, 1)


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"resource": "GET /api/v1/agent/pay-api/atlas"}, 402, "invoice_mismatch"),
        ({"payee": "gw_someoneelse000"}, 402, "invoice_mismatch"),
        ({"asset": "USDC"}, 402, "invoice_mismatch"),
        ({"channel_id": "ch_doesnotexist0000"}, 402, "unknown_channel"),
        ({"sequence": 0}, 400, "malformed_payment"),
        ({"cumulative": "0.0000001"}, 400, "malformed_payment"),
        ({"cumulative": 1}, 400, "malformed_payment"),
        ({"channel_id": "ch bad id!"}, 400, "malformed_payment"),
        ({"extra": "field"}, 400, "malformed_payment"),
    ],
)
async def test_bad_vouchers_are_refused_before_the_ledger_moves(
    stack: Stack,
    ledger: Ledger,
    client: httpx.AsyncClient,
    change: dict[str, Any],
    status: int,
    reason: str,
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_fast(ledger, stack, wallet.public_key, USDF)
    path = VERIFY.format(n=2)
    terms = {
        "channel_id": channel_id,
        "cumulative": "0.01",
        "sequence": 1,
        "resource": f"GET {path}",
    }
    fields = {"asset": "USDF", "payee": stack.gateway_identity.kid, **terms, **change}
    signed = vouchers.sign_voucher(fields, wallet)
    signed.update({k: v for k, v in change.items() if k not in signed})  # unknown fields too

    response = await client.get(path, headers={"X-Payment": protocol.encode_header(signed)})

    await expect(response, status, reason)
    state = await Channels(ledger).get(wallet.public_key, channel_id)
    assert (state.cumulative, state.sequence) == (0, 0)


async def test_a_forged_or_suspended_voucher_is_refused(
    stack: Stack, ledger: Ledger, client: httpx.AsyncClient
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_fast(ledger, stack, wallet.public_key, USDF)
    path = VERIFY.format(n=3)
    terms = {
        "channel_id": channel_id,
        "cumulative": "0.01",
        "sequence": 1,
        "resource": f"GET {path}",
    }
    forged = vouchers.sign_voucher(
        {"asset": "USDF", "payee": stack.gateway_identity.kid, **terms}, Identity.generate()
    )
    forged["payer"] = wallet.public_key  # signed by someone else on the payer's behalf
    await expect(
        await client.get(path, headers={"X-Payment": protocol.encode_header(forged)}),
        402,
        "invalid_signature",
    )

    await ledger.set_status(wallet.public_key, SUSPENDED)
    await expect(
        await client.get(path, headers=voucher_header(stack, wallet, **terms)),
        403,
        "payer_suspended",
    )


async def test_the_sdk_resyncs_after_a_lost_answer_and_never_pays_twice(
    stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_channel(stack, wallet.public_key, "0.05")
    lane = PaymentChannel(Wallet(wallet), channel_id, deposit="0.05")
    async with httpx.AsyncClient(base_url=stack.url, auth=ChannelAuth(lane), timeout=10) as agent:
        assert (await agent.get(VERIFY.format(n=1))).status_code == 200
        # A voucher the gateway accepted but whose answer the agent never saw.
        lost = lane.issue(f"GET {VERIFY.format(n=2)}", "0.01", stack.gateway_identity.kid)
        async with httpx.AsyncClient(base_url=stack.url) as raw:
            headers = {"X-Payment": protocol.encode_header(lost.voucher)}
            assert (await raw.get(VERIFY.format(n=2), headers=headers)).status_code == 200
        lane.refused(lost)  # the agent believes it failed and takes the amount back

        # Its next voucher raises nothing over the gateway's state: refused, resynced, paid.
        response = await agent.get(VERIFY.format(n=3))

        assert response.status_code == 200
        assert b64json(response.headers["x-payment-response"])["cumulative"] == "0.03"
        state = await Channels(ledger).get(wallet.public_key, channel_id)
        assert (state.cumulative, state.sequence) == (30_000, 4)  # 3 requests, 3 charges
        # The deposit runs out on the agent's side before anything is signed.
        assert (await agent.get(VERIFY.format(n=4))).status_code == 200
        assert (await agent.get(VERIFY.format(n=5))).status_code == 200
        with pytest.raises(ChannelExhausted):
            await agent.get(VERIFY.format(n=6))


async def test_a_channel_close_settles_and_its_evidence_verifies(
    stack: Stack, ledger: Ledger, tmp_path: Any
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_channel(stack, wallet.public_key, "0.5")
    lane = PaymentChannel(Wallet(wallet), channel_id)
    async with httpx.AsyncClient(base_url=stack.url, auth=ChannelAuth(lane), timeout=10) as agent:
        for n in range(5):
            assert (await agent.get(VERIFY.format(n=n))).status_code == 200
    await x402(
        "channel", "close", wallet.public_key, channel_id, "--config", str(stack.config_path)
    )
    anchors = str(tmp_path / "anchors.jsonl")
    assert (await settle(stack, "--anchor-file", anchors)).code == 0
    bundle = tmp_path / "bundle.json"
    exported = await x402(
        "evidence", "export", "--payer", wallet.public_key, "--out", str(bundle),
        "--config", str(stack.config_path),
    )  # fmt: skip
    assert exported.code == 0, exported.err

    key = stack.gateway_identity.public_key
    ok = await x402("evidence", "verify", str(bundle), "--key", key)
    assert ok.code == 0, ok.out
    document = json.loads(bundle.read_text())
    [item] = document["receipts"]
    assert item["receipt"]["voucher"]["cumulative"] == "0.05"
    # The settled amount must be what the payer's final voucher signed for.
    item["receipt"]["voucher"]["cumulative"] = "0.5"
    bundle.write_text(json.dumps(document))
    bad = await x402("evidence", "verify", str(bundle), "--key", key)
    assert bad.code == 1
    assert "the payer's final voucher signature does not verify" in bad.out


async def test_the_settle_pass_closes_expired_channels(
    stack: Stack, ledger: Ledger, client: httpx.AsyncClient, tmp_path: Any
) -> None:
    wallet = await funded_payer(ledger, USDF)
    channel_id, _ = await Channels(ledger).open(
        wallet.public_key, "USDF", 100_000, stack.gateway_identity.kid, ttl=1
    )
    path = VERIFY.format(n=1)
    terms = {"channel_id": channel_id, "resource": f"GET {path}"}
    first = voucher_header(stack, wallet, cumulative="0.01", sequence=1, **terms)
    assert (await client.get(path, headers=first)).status_code == 200
    await asyncio.sleep(2.1)  # past expires_at (whole seconds)

    late = voucher_header(stack, wallet, cumulative="0.02", sequence=2, **terms)
    await expect(await client.get(path, headers=late), 402, "channel_closed")
    assert (await settle(stack, "--anchor-file", str(tmp_path / "a.jsonl"))).code == 0

    state = await Channels(ledger).get(wallet.public_key, channel_id)
    assert (state.status, state.refund) == ("closed", 90_000)
    assert await conserved(ledger, wallet.public_key) == {
        "credited": USDF,
        "balance": USDF - 10_000,
        "channeled": 0,
        "debited": 10_000,
    }
    # Its close was settled in the same pass.
    [(_id, entry)] = await xrange(raw(ledger), keyspace.receipts(wallet.public_key))
    assert entry["kind"] == "channel"
    assert await raw(ledger).llen(keyspace.payer_batches(wallet.public_key)) == 1


async def test_a_voucher_accepted_after_envoy_gave_up_still_gets_its_log_line(
    stack: Stack, ledger: Ledger
) -> None:
    """The real servicer in process; Redis paused (DEBUG SLEEP) while the voucher is in it,
    the check cancelled as Envoy's timeout would: the line is written when Redis answers."""
    settings = Settings.load(stack.config_path)
    log = io.StringIO()
    servicer = CheckService(
        settings.route_table(),
        settings.gateway(),
        Ledger.from_url(stack.redis_url, timeout=5),
        decisions=DecisionLog(stream=log),
    )
    wallet = await funded_payer(ledger, USDF)
    channel_id = await open_fast(ledger, stack, wallet.public_key, USDF)
    path = VERIFY.format(n=1)
    check = authz.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host = "GET", path, "gw"
    terms = {"channel_id": channel_id, "resource": f"GET {path}"}
    http.headers["x-payment"] = voucher_header(
        stack, wallet, cumulative="0.01", sequence=1, **terms
    )["X-Payment"]
    await cancel_while_redis_stalls(servicer, ledger, scripts.VOUCHER, check)

    state = await Channels(ledger).get(wallet.public_key, channel_id)
    assert (state.cumulative, state.sequence) == (10_000, 1)
    [line] = [json.loads(text) for text in log.getvalue().splitlines()]
    assert (line["decision"], line["reason"], line["cancelled"]) == ("allow", "channel", True)
    assert line["channel_id"] == channel_id and line["balance"] == "0.99"
    await servicer.ledger.close()
