"""Optional rate limits on paid checks, through real Envoy and the sidecar process: per
payer and per client address (each test connects from its own 127.0.0.x), 429
rate_limited with Retry-After, nothing charged, the proof still good later."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from sidecar.core.errors import LedgerUnavailable
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
from sidecar.ledger.rate_limit import Rate, RateLimiter
from sidecar.tools.stack import LOOPBACK, Stack, free_port
from tests.support.payers import funded_payer, pay_direct, voucher_header
from tests.support.routes import ENVOY_ROUTES, ROUTES

PATH = "/api/v1/trade/verify/T-7"  # 0.01 USDF
PRICE = 10_000
PAYER_BURST, IP_BURST = 3, 10  # both refill at 1 per second


@pytest.fixture(scope="module")
def limited() -> Iterator[Stack]:
    settings = {
        "rate_limit_payer_per_second": 1,
        "rate_limit_payer_burst": PAYER_BURST,
        "rate_limit_ip_per_second": 1,
        "rate_limit_ip_burst": IP_BURST,
    }
    with Stack(ROUTES, envoy_routes=ENVOY_ROUTES, settings=settings) as stack:
        yield stack


@pytest.fixture(scope="module")
async def lledger(limited: Stack) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(limited.redis_url)
    yield ledger
    await ledger.close()


@asynccontextmanager
async def agent(stack: Stack, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose connections come from `address`: Envoy reports it as the source."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=stack.url, transport=transport, timeout=10) as http:
        yield http


def receipt_balance(response: httpx.Response) -> str:
    return str(json.loads(base64.b64decode(response.headers["x-payment-response"]))["balance"])


def assert_limited(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert (body["error"], body["limit"]) == ("rate_limited", limit)
    assert body["message"] and "x402" not in body  # not a 402: paying again will not help
    assert int(response.headers["retry-after"]) == body["retry_after"] >= 1


async def test_a_payer_over_its_rate_is_refused_and_not_charged(
    limited: Stack, lledger: Ledger
) -> None:
    wallet, other = await funded_payer(lledger, 100 * PRICE), await funded_payer(lledger, PRICE)
    async with agent(limited, "127.0.0.2") as client:
        for _ in range(PAYER_BURST):
            proof = pay_direct(limited, wallet, f"GET {PATH}", "0.01")
            assert (await client.get(PATH, headers=proof)).status_code == 200
        over = pay_direct(limited, wallet, f"GET {PATH}", "0.01")

        refused = await client.get(PATH, headers=over)

        assert_limited(refused, "payer")
        assert await limited.balance(wallet.public_key) == 97 * PRICE  # not charged
        # Another payer, same address: its own allowance.
        paid = await client.get(PATH, headers=pay_direct(limited, other, f"GET {PATH}", "0.01"))
        assert paid.status_code == 200 and receipt_balance(paid) == "0"
        # The refused proof's nonce was not spent: once the bucket refills, it pays.
        await asyncio.sleep(int(refused.headers["retry-after"]) + 0.1)
        later = await client.get(PATH, headers=over)
        assert later.status_code == 200, later.text
        assert receipt_balance(later) == "0.96"
    lines = [line for line in limited.decisions() if line["payer"] == wallet.public_key]
    assert [line["status"] for line in lines].count(429) == 1
    assert {line["reason"] for line in lines} == {"paid", "rate_limited"}


async def test_a_replayed_proof_takes_no_token_from_its_payer(
    limited: Stack, lledger: Ledger
) -> None:
    wallet = await funded_payer(lledger, 10 * PRICE)
    async with agent(limited, "127.0.0.3") as client:
        proof = pay_direct(limited, wallet, f"GET {PATH}", "0.01")
        first = await client.get(PATH, headers=proof)
        assert first.status_code == 200
        # A thief replaying a captured proof: redelivered uncharged up to the limit, then
        # refused; none of it takes a token.
        replays = [await client.get(PATH, headers=proof) for _ in range(PAYER_BURST + 4)]
        redelivered = replays[:DEFAULT_REDELIVERY_LIMIT]
        assert {(r.status_code, r.headers["payment-response"]) for r in redelivered} == {
            (200, first.headers["payment-response"])
        }
        for replay in replays[DEFAULT_REDELIVERY_LIMIT:]:
            assert (replay.status_code, replay.json()["error"]) == (402, "nonce_reused")
        for _ in range(PAYER_BURST - 1):  # the payer's own allowance is intact
            fresh = pay_direct(limited, wallet, f"GET {PATH}", "0.01")
            assert (await client.get(PATH, headers=fresh)).status_code == 200


async def test_an_address_over_its_rate_is_refused_and_not_charged(
    limited: Stack, lledger: Ledger
) -> None:
    wallets = [await funded_payer(lledger, PRICE) for _ in range(IP_BURST + 1)]
    async with agent(limited, "127.0.0.4") as client:
        for wallet in wallets[:IP_BURST]:
            proof = pay_direct(limited, wallet, f"GET {PATH}", "0.01")
            assert (await client.get(PATH, headers=proof)).status_code == 200
        last = wallets[-1]
        proof = pay_direct(limited, last, f"GET {PATH}", "0.01")

        assert_limited(await client.get(PATH, headers=proof), "ip")
        assert await limited.balance(last.public_key) == PRICE
        # Free routes and challenges never touch the limiter.
        assert (await client.get("/api/v1/health")).status_code == 200
        assert (await client.get(PATH)).status_code == 402
    async with agent(limited, "127.0.0.5") as elsewhere:  # another address: unaffected
        paid = await elsewhere.get(PATH, headers=proof)  # the same proof: its nonce is unused
        assert paid.status_code == 200 and receipt_balance(paid) == "0"


async def test_vouchers_count_against_the_payer_too(limited: Stack, lledger: Ledger) -> None:
    wallet = await funded_payer(lledger, 100 * PRICE)
    channel_id, _left = await Channels(lledger).open(
        wallet.public_key, "USDF", 50 * PRICE, limited.gateway_identity.kid
    )

    def voucher(sequence: int) -> dict[str, str]:
        cumulative = f"0.{sequence:02d}"  # 0.01 per request
        terms = {"channel_id": channel_id, "cumulative": cumulative, "sequence": sequence}
        return voucher_header(limited, wallet, resource=f"GET {PATH}", **terms)

    async with agent(limited, "127.0.0.6") as client:
        for sequence in range(1, PAYER_BURST + 1):
            assert (await client.get(PATH, headers=voucher(sequence))).status_code == 200
        refused = await client.get(PATH, headers=voucher(PAYER_BURST + 1))
        assert_limited(refused, "payer")
        state = await Channels(lledger).get(wallet.public_key, channel_id)
        assert (state.sequence, state.cumulative) == (PAYER_BURST, PAYER_BURST * PRICE)
        await asyncio.sleep(int(refused.headers["retry-after"]) + 0.1)
        # The refused voucher moved nothing: the very same one is accepted now.
        assert (await client.get(PATH, headers=voucher(PAYER_BURST + 1))).status_code == 200


async def test_a_limiter_that_cannot_reach_redis_fails_closed() -> None:
    dead = Ledger.from_url(f"redis://{LOOPBACK}:{free_port()}/0", timeout=0.2)
    limiter = RateLimiter(dead, payer=Rate(1, 1), ip=Rate(1, 1))
    with pytest.raises(LedgerUnavailable):
        await limiter.check("payer", "127.0.0.1", "n" * 22)
    await dead.close()
