"""The ledger on a real Redis Cluster: three masters (`redis-server --cluster-enabled yes`,
joined by `redis-cli --cluster create`) on loopback, the sidecar and Envoy in front, the
sidecar configured with `redis_url: redis+cluster://...` (docs/redis.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol, vouchers
from sidecar.core.errors import InsufficientFunds, NonceReused, RateLimited, X402Error
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels, Nonce
from sidecar.ledger.cluster import ClusterPipe, parse_cluster_url, slot_of
from sidecar.ledger.rate_limit import Rate, RateLimiter
from sidecar.tools.stack import LOOPBACK, Stack
from tests.support.cluster import finish_migration, migrate, node, slot_owners
from tests.support.conservation import run_and_check
from tests.support.payers import funded_payer, paid_requests, pay_direct
from tests.support.routes import ENVOY_ROUTES, ROUTES, VERIFY
from tests.support.settlement import assert_exactly_once, remember_gateway, settle
from tests.support.streams import raw_pipe

MASTERS = 3
PRICE = 10_000
GATEWAY = Identity.generate()  # the cluster stack's signing key


@pytest.fixture(scope="module")
def cluster() -> Iterator[Stack]:
    stack = Stack(ROUTES, envoy_routes=ENVOY_ROUTES, redis_cluster=MASTERS)
    stack.gateway_identity = GATEWAY  # the payee of `receipt`'s debits: settlement re-signs
    stack.settings = {"anchor_file": str(stack.dir / "anchors.jsonl")}
    with stack:
        remember_gateway(stack)
        yield stack


@pytest.fixture(scope="module")
async def cledger(cluster: Stack) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(cluster.redis_url)
    yield ledger
    await ledger.close()


@pytest.fixture
async def cclient(cluster: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as http:
        yield http


def receipt(nonce: str, amount: int) -> dict[str, str | int]:
    """The receipt fields the servicer stores with a debit (settlement re-signs them)."""
    return {
        "nonce": nonce,
        "invoice_id": "",
        "resource": "GET /api/v1/trade/verify/T-1",
        "asset": "USDF",
        "amount": amount,
        "route": "verify",
        "issued_at": int(time.time()),
        "payee": GATEWAY.kid,  # the key that signs the receipt, and re-signs it when settled
    }


async def debit(ledger: Ledger, payer: str, amount: int, receipt_id: str) -> int:
    nonce = protocol.new_nonce()
    expires = int(time.time()) + 60
    left = await ledger.debit(
        payer, nonce, "USDF", amount, expires, receipt_id, receipt(nonce, amount)
    )
    assert isinstance(left, int)
    return left


def payer_keys(payer: str) -> list[str]:
    return [
        keyspace.account(payer),
        keyspace.nonce(payer, "n" * 22),
        keyspace.receipts(payer),
        keyspace.credits(payer),
        keyspace.idempotency(payer, "k"),
        keyspace.settlement(payer),
        keyspace.payer_batches(payer),
        keyspace.channel(payer, "ch_x"),
        keyspace.channels(payer),
        keyspace.outcome(payer, "own:n"),
        keyspace.replays(payer),
    ]


@pytest.mark.parametrize(
    ("url", "seeds", "username", "password"),
    [
        ("redis+cluster://10.0.0.1:7000", (("10.0.0.1", 7000),), "", ""),
        ("redis+cluster://a:7000,b,c:7002/0", (("a", 7000), ("b", 6379), ("c", 7002)), "", ""),
        ("redis+cluster://:p%40ss@a:7000", (("a", 7000),), "", "p@ss"),
        ("redis+cluster://ledger:s3cret@[::1]:7000", (("::1", 7000),), "ledger", "s3cret"),
    ],
)
def test_cluster_urls(url: str, seeds: tuple[Any, ...], username: str, password: str) -> None:
    address = parse_cluster_url(url)
    assert (address.seeds, address.username, address.password) == (seeds, username, password)
    assert password not in repr(address) or not password


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://", "redis+cluster://a:7000/1", "redis+cluster://a:99999", "redis://a"],
)
def test_bad_cluster_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_cluster_url(url)
    if url != "redis://a":
        with pytest.raises(X402Error, match="redis_url"):
            Ledger.from_url(url)


async def test_every_key_of_a_payer_is_in_one_slot(cluster: Stack) -> None:
    payer = Identity.generate().public_key
    async with node(cluster.cluster_ports[0]) as any_node:
        slots = {await any_node.cluster("KEYSLOT", key) for key in payer_keys(payer)}
    assert slots == {slot_of(keyspace.account(payer))}


async def test_ledger_round_trip(cledger: Ledger) -> None:
    assert isinstance(raw_pipe(cledger), ClusterPipe) and cledger.cluster
    wallet = Identity.generate()
    payer = wallet.public_key
    assert await cledger.register(payer)
    assert not await cledger.register(payer)
    credit = await cledger.credit(payer, "USDF", 1_000_000, "top-up-1")
    assert (credit.balance, credit.applied) == (1_000_000, True)
    assert not (await cledger.credit(payer, "USDF", 1_000_000, "top-up-1")).applied
    nonce = protocol.new_nonce()
    expires = int(time.time()) + 60
    fields = receipt(nonce, 250_000)

    assert await cledger.debit(payer, nonce, "USDF", 250_000, expires, "rcpt_1", fields) == 750_000
    with pytest.raises(NonceReused):
        await cledger.debit(payer, nonce, "USDF", 250_000, expires, "rcpt_2", fields)
    with pytest.raises(InsufficientFunds):
        await debit(cledger, payer, 900_000, "rcpt_3")

    account = await cledger.account(payer)
    assert (account.balances, account.credited, account.debited) == (
        {"USDF": 750_000},
        {"USDF": 1_000_000},
        {"USDF": 250_000},
    )
    [stored] = await cledger.receipts(payer)
    assert (stored["receipt_id"], stored["balance"]) == ("rcpt_1", "750000")
    assert await cledger.ping()


async def test_payers_spread_over_the_masters(cluster: Stack, cledger: Ledger) -> None:
    payers = [Identity.generate().public_key for _ in range(12)]
    for payer in payers:
        await cledger.register(payer)
        await cledger.credit(payer, "USDF", 5, "k")
    owners = await slot_owners(cluster.cluster_ports[0])
    homes = {}
    for payer in payers:
        home = owners[slot_of(keyspace.account(payer))]
        async with node(home) as master:  # the keys really are on that master
            assert await master.exists(keyspace.account(payer), keyspace.credits(payer)) == 2
        pipe = raw_pipe(cledger)
        assert isinstance(pipe, ClusterPipe)
        assert pipe.owner(keyspace.account(payer)) == (LOOPBACK, home)
        homes[payer] = home
    assert len(set(homes.values())) >= 2  # 12 random payers on one of 3 masters: p ≈ 6e-6


async def test_concurrent_payments_never_overspend(
    cluster: Stack, cledger: Ledger, cclient: httpx.AsyncClient
) -> None:
    """Through Envoy and the sidecar process, which reads `redis+cluster://` from its config."""
    path = VERIFY.format(n=9)
    wallet = await funded_payer(cledger, 50 * PRICE)
    proofs = [pay_direct(cluster, wallet, f"GET {path}", "0.01") for _ in range(200)]

    responses = await asyncio.gather(*(cclient.get(path, headers=h) for h in proofs))

    statuses = [r.status_code for r in responses]
    assert (statuses.count(200), statuses.count(402)) == (50, 150)
    assert {r.json()["error"] for r in responses if r.status_code == 402} == {"insufficient_funds"}
    account = await cledger.account(wallet.public_key)
    assert (account.balances["USDF"], account.debited["USDF"]) == (0, 50 * PRICE)
    receipts = await cledger.receipts(wallet.public_key, count=1000)
    assert len({r["receipt_id"] for r in receipts}) == len(receipts) == 50
    assert sorted(int(r["balance"]) for r in receipts) == [i * PRICE for i in range(50)]


async def test_money_is_conserved(cluster: Stack) -> None:
    books = await run_and_check(cluster, operations=1200, seed=403)
    assert books.outcomes["allow"] > 100


async def test_channels_and_settlement(
    cluster: Stack, cledger: Ledger, cclient: httpx.AsyncClient
) -> None:
    """Every other script on the cluster: channel open, vouchers (on the pipe), close, then
    `x402 settle` (a real process) scans `x402:payers` and batches every payer's receipts.
    The open and close are self-serve ones: each spends a nonce key in the payer's slot."""
    wallet = await funded_payer(cledger, 2_000_000)
    payer = wallet.public_key
    await paid_requests(cclient, cluster, wallet, 30)
    expires = int(time.time()) + 60
    channel_id, _left = await Channels(cledger).open(
        payer,
        "USDF",
        1_000_000,
        cluster.gateway_identity.kid,
        nonce=Nonce(protocol.new_nonce(), expires),
    )
    lane = PaymentChannel(Wallet(wallet), channel_id, deposit="1")
    async with httpx.AsyncClient(
        base_url=cluster.url, auth=ChannelAuth(lane, strict=True), timeout=10
    ) as agent:
        for n in range(20):
            assert (await agent.get(VERIFY.format(n=n))).status_code == 200
    closing = Nonce(protocol.new_nonce(), expires)
    closed = await Channels(cledger).close(payer, channel_id, nonce=closing)
    assert closed is not None and (closed.cumulative, closed.refund) == (20 * PRICE, 800_000)
    with pytest.raises(NonceReused):  # the close request replayed
        await Channels(cledger).close(payer, channel_id, nonce=closing)
    account = await cledger.account(payer)
    assert account.balances["USDF"] == 2_000_000 - 50 * PRICE

    run = await settle(cluster)
    assert run.code == 0, run.err

    per_payer = await assert_exactly_once(cledger, cluster.gateway_identity.public_key)
    assert per_payer[payer] == 31  # 30 paid requests and the channel's close


async def test_rate_limits_on_the_cluster(cluster: Stack, cledger: Ledger) -> None:
    """Each bucket is one key in one slot: the payer's beside its account, the address's
    wherever its own tag hashes."""
    assert isinstance(raw_pipe(cledger), ClusterPipe)
    limiter = RateLimiter(cledger, payer=Rate(1, 2), ip=Rate(1, 5))
    payer = Identity.generate().public_key
    for _ in range(2):
        await limiter.check(payer, "192.0.2.7", protocol.new_nonce())
    with pytest.raises(RateLimited) as refused:
        await limiter.check(payer, "192.0.2.7", protocol.new_nonce())
    assert refused.value.details["limit"] == "payer"
    owners = await slot_owners(cluster.cluster_ports[0])
    for key in (keyspace.payer_rate(payer), keyspace.ip_rate("192.0.2.7")):
        async with node(owners[slot_of(key)]) as home:
            assert await home.exists(key) == 1
    assert slot_of(keyspace.payer_rate(payer)) == slot_of(keyspace.account(payer))


async def test_a_migrating_slot_is_followed(cluster: Stack, cledger: Ledger) -> None:
    """Resharding while the hot path runs: a voucher is served on the target after ASK; a
    debit (its fresh nonce key is on neither side) gets TRYAGAIN until the slot has moved,
    then MOVED, and goes through once; the pipe's slot map follows."""
    wallet = await funded_payer(cledger, 1_000_000)
    payer = wallet.public_key
    channels = Channels(cledger)
    channel_id, _left = await channels.open(payer, "USDF", 500_000, cluster.gateway_identity.kid)
    account_key = keyspace.account(payer)
    slot = slot_of(account_key)
    owners = await slot_owners(cluster.cluster_ports[0])
    source = owners[slot]
    target = next(port for port in cluster.cluster_ports if port != source)
    pipe = raw_pipe(cledger)
    assert isinstance(pipe, ClusterPipe)
    assert await debit(cledger, payer, PRICE, "r1")
    assert pipe.owner(account_key) == (LOOPBACK, source)

    await migrate(source, target, slot, cluster.cluster_ports)
    try:
        voucher = _voucher(cluster, wallet, channel_id)
        price = Price("verify", PRICE, Asset("USDF", 6))
        accepted = await channels.accept(voucher, PRICE, price, voucher.payee, 0)
        assert accepted == (500_000 - PRICE, PRICE)  # served by the target, after ASK

        pending = asyncio.ensure_future(debit(cledger, payer, PRICE, "r2"))
        await asyncio.sleep(0.15)
        assert not pending.done()  # TRYAGAIN, retried while the slot is in flight
    finally:
        await finish_migration(target, slot, cluster.cluster_ports)
    assert await pending == 1_000_000 - 500_000 - 2 * PRICE
    # The retried debit may have ended on the ASK path (which leaves the map alone) or
    # after a MOVED; by the next call at the latest, MOVED has fixed the map.
    assert await debit(cledger, payer, PRICE, "r3")
    assert pipe.owner(account_key) == (LOOPBACK, target)
    account = await cledger.account(payer)
    assert account.debited["USDF"] == 3 * PRICE
    async with node(target) as dst:
        assert await dst.exists(account_key) == 1


def _voucher(stack: Stack, wallet: Identity, channel_id: str) -> vouchers.Voucher:
    fields = {
        "channel_id": channel_id,
        "asset": "USDF",
        "cumulative": "0.01",
        "sequence": 1,
        "resource": f"GET {VERIFY.format(n=1)}",
        "payee": stack.gateway_identity.kid,
    }
    return vouchers.voucher_from(vouchers.sign_voucher(fields, wallet))


async def test_a_dead_master_fails_its_payers_closed_and_no_one_else(
    cluster: Stack, cledger: Ledger, cclient: httpx.AsyncClient
) -> None:
    """Last in this module: it kills a master. Its payers get 503 ledger_unavailable (never
    a free pass), payers on the other masters are still served and charged."""
    owners = await slot_owners(cluster.cluster_ports[0])
    wallets = [await funded_payer(cledger, PRICE) for _ in range(12)]
    home = {w.public_key: owners[slot_of(keyspace.account(w.public_key))] for w in wallets}
    victim = home[wallets[0].public_key]
    cluster.processes[f"redis{cluster.cluster_ports.index(victim)}"].kill()

    path = VERIFY.format(n=3)
    for wallet in wallets:
        proof = pay_direct(cluster, wallet, f"GET {path}", "0.01")
        response = await cclient.get(path, headers=proof)
        if home[wallet.public_key] == victim:
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "ledger_unavailable"
            assert response.headers["retry-after"] == "1"
        else:
            assert response.status_code == 200, response.text
            # (a client that was up before the kill: a new redis-py cluster client asks the
            # first listed master at start, so it may fail while a dead one is listed)
            assert (await cledger.account(wallet.public_key)).balances["USDF"] == 0
    assert len(set(home.values())) >= 2
    ready = await cclient.get(f"{cluster.sideport_url}/readyz")
    assert (ready.status_code, ready.json()) == (503, {"status": "ledger_unavailable"})
