"""The agent SDK pays the x402 `exact` scheme and buys prepaid credit, through the real
stack: anvil + Circle's FiatTokenV2_2, the official facilitator (`x402 facilitator serve`),
real Envoy, the sidecar and Redis. Signatures are the official x402 client's. No mocks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.agent import TOPUP_EXTENSION, receipt_of
from sidecar.agent.auth import X402Auth
from sidecar.agent.evm import EvmKey
from sidecar.agent.requests_adapter import x402_session
from sidecar.agent.topup import topup
from sidecar.agent.wallet import Wallet
from sidecar.core.errors import (
    AssetNotAllowed,
    BudgetExceeded,
    MaxAmountExceeded,
    PayeeNotAllowed,
    TopUpFailed,
)
from sidecar.core.identity import Identity
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, operator
from sidecar.tools.stack import Stack

PAID = "/api/paid"  # 0.01 USDF, also payable with 0.01 USDC (exact)
DEAR = "/api/dear"  # 0.4 USDF
PRICE, DEAR_PRICE = 10_000, 400_000
ATLAS = "/api/v1/agent/pay-api/atlas"  # the README's route
ROUTES = {
    "paid": {"method": "GET", "path": PAID, "price": "0.01"},
    "dear": {"method": "GET", "path": DEAR, "price": "0.4"},
    "atlas": {"method": "GET", "path": ATLAS, "price": "0.25"},
}
README = Path(__file__).resolve().parents[1] / "README.md"
MINTED = 50_000_000  # 50 USDC per agent key
TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")
X402 = str(Path(sys.executable).with_name("x402"))


@pytest.fixture(scope="module")
def gw(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    with Stack(ROUTES, settings=exact_settings(chain, facilitator)) as running:
        yield running


def agent_key(chain: AnvilChain) -> EvmKey:
    """A fresh EVM key holding USDC (no ETH: the facilitator pays the gas). Each test pays
    from its own key, so balances are per test."""
    key = EvmKey.generate()
    chain.mint(key.address, MINTED)
    return key


def balances(chain: AnvilChain, key: EvmKey) -> tuple[int, int]:
    return chain.balance_of(key.address), chain.balance_of(operator(chain).address)


def topups(stack: Stack, payer_key: str) -> list[dict[str, Any]]:
    """The top-ups the gateway credited to one key."""
    return [line for line in topup_lines(stack, payer_key) if line["decision"] == "allow"]


def topup_lines(stack: Stack, payer_key: str) -> list[dict[str, Any]]:
    """The sidecar's top-up decision lines for one Ed25519 key."""
    found = []
    for line in stack.processes["sidecar"].log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "topup.decision" and entry.get("payer") == payer_key:
            found.append(entry)
    return found


class Sent:
    """httpx event hook: (method, path, which payment header) of every request sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    def _record(self, request: httpx.Request) -> None:
        header = next((h for h in ("payment-signature", "x-payment") if h in request.headers), "-")
        self.requests.append((request.method, request.url.path, header))

    @property
    def hooks(self) -> dict[str, list[Any]]:
        return {"request": [self._record]}

    @property
    def ahooks(self) -> dict[str, list[Any]]:
        async def hook(request: httpx.Request) -> None:
            self._record(request)

        return {"request": [hook]}


# -- exact on a priced route ----------------------------------------------------------------


def test_a_wallet_with_only_an_evm_key_pays_exact(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    wallet = Wallet(evm=account, budget="1")
    before = balances(chain, account)
    sent = Sent()
    auth = X402Auth(wallet, strict=True)
    with httpx.Client(base_url=gw.url, auth=auth, timeout=60, event_hooks=sent.hooks) as http:
        response = http.get(PAID, params={"q": "exact"})
    assert response.status_code == 200, response.text
    payer_address, operator_balance = balances(chain, account)
    assert payer_address == before[0] - PRICE
    assert operator_balance == before[1] + PRICE
    receipt = receipt_of(response)
    assert receipt is not None and receipt.verified
    assert (receipt.asset, receipt.amount, receipt.resource) == ("USDF", "0.01", f"GET {PAID}")
    assert receipt.payer.lower() == account.address.lower()
    transaction = receipt.fields["transaction"]
    assert TX_HASH.match(transaction)
    assert chain.w3.eth.get_transaction_receipt(transaction)["status"] == 1
    # Discovery, the 402 (no Ed25519 key: no direct proof), the paid retry.
    assert sent.requests == [
        ("GET", "/.well-known/x402", "-"),
        ("GET", PAID, "-"),
        ("GET", PAID, "payment-signature"),
    ]
    assert (wallet.spent("USDF"), wallet.remaining("USDF")) == ("0.01", "0.99")


async def test_exact_payments_from_async_tasks_each_move_the_price_once(
    gw: Stack, chain: AnvilChain
) -> None:
    account = agent_key(chain)
    wallet = Wallet(evm=account)
    before = balances(chain, account)
    auth = X402Auth(wallet, strict=True)
    async with httpx.AsyncClient(base_url=gw.url, auth=auth, timeout=60) as http:
        responses = await asyncio.gather(*(http.get(PAID) for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    transactions = {receipt_of(r).fields["transaction"] for r in responses}  # type: ignore[union-attr]
    assert len(transactions) == 3
    assert balances(chain, account) == (before[0] - 3 * PRICE, before[1] + 3 * PRICE)
    assert wallet.spent("USDF") == "0.03"


def test_the_requests_adapter_pays_exact_too(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    before = balances(chain, account)
    session = x402_session(X402Auth(Wallet(evm=account), strict=True))
    response = session.get(f"{gw.url}{PAID}", timeout=60)
    assert response.status_code == 200, response.text
    assert receipt_of(response).verified  # type: ignore[union-attr]
    assert balances(chain, account) == (before[0] - PRICE, before[1] + PRICE)


async def test_a_wallet_with_both_keys_pays_prepaid_where_it_can(
    gw: Stack, chain: AnvilChain
) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account)
    await gw.fund(wallet.public_key, "1")
    before = balances(chain, account)
    async with httpx.AsyncClient(base_url=gw.url, auth=X402Auth(wallet, strict=True)) as http:
        response = await http.get(PAID)
    assert response.status_code == 200
    assert receipt_of(response).payer == wallet.public_key  # type: ignore[union-attr]
    assert await gw.balance(wallet.public_key) == 1_000_000 - PRICE
    assert balances(chain, account) == before  # nothing on chain


@pytest.mark.parametrize(
    ("guards", "error"),
    [
        ({"max_amount": "0.009"}, MaxAmountExceeded),
        ({"budget": "0.005"}, BudgetExceeded),
        ({"assets": ["EURF"]}, AssetNotAllowed),
        ({"payees": ["gw_someone_else"]}, PayeeNotAllowed),
    ],
)
def test_guards_refuse_an_exact_payment_before_anything_is_signed(
    gw: Stack, chain: AnvilChain, guards: dict[str, Any], error: type[Exception]
) -> None:
    account = agent_key(chain)
    wallet = Wallet(evm=account, **guards)
    before = balances(chain, account)
    sent = Sent()
    with (
        httpx.Client(base_url=gw.url, auth=X402Auth(wallet), event_hooks=sent.hooks) as http,
        pytest.raises(error),
    ):
        http.get(PAID)
    assert [header for _m, _p, header in sent.requests] == ["-", "-"]  # discovery, the 402
    assert balances(chain, account) == before
    assert wallet.spent("USDF") == "0"


def test_the_asset_and_payee_guards_also_take_the_token_and_the_pay_to_address(
    gw: Stack, chain: AnvilChain
) -> None:
    account = agent_key(chain)
    wallet = Wallet(evm=account, assets=[chain.token], payees=[operator(chain).address])
    with httpx.Client(base_url=gw.url, auth=X402Auth(wallet, strict=True), timeout=60) as http:
        assert http.get(PAID).status_code == 200
    assert wallet.spent("USDF") == "0.01"


# -- auto top-up -------------------------------------------------------------------------------


async def test_auto_topup_funds_a_fresh_key_once_for_concurrent_requests(
    gw: Stack, chain: AnvilChain
) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account, budget="2")
    before = balances(chain, account)
    count = 8
    auth = X402Auth(wallet, auto_topup="1", strict=True)
    async with httpx.AsyncClient(base_url=gw.url, auth=auth, timeout=60) as http:
        responses = await asyncio.gather(*(http.get(PAID) for _ in range(count)))
    assert [r.status_code for r in responses] == [200] * count
    assert all(receipt_of(r).verified for r in responses)  # type: ignore[union-attr]
    # One top-up of 1 USDC bought 1 USDF of credit; eight requests spent 0.08 of it.
    assert len(topups(gw, wallet.public_key)) == 1
    assert balances(chain, account) == (before[0] - 1_000_000, before[1] + 1_000_000)
    assert await gw.balance(wallet.public_key) == 1_000_000 - count * PRICE
    bought = [r.extensions[TOPUP_EXTENSION] for r in responses if TOPUP_EXTENSION in r.extensions]
    assert len(bought) == 1 and bought[0].verified
    assert (bought[0].credited, bought[0].payer) == ("1", wallet.public_key)
    assert chain.w3.eth.get_transaction_receipt(bought[0].transaction)["status"] == 1
    # The top-up counts against the budget, and so do the requests paid from its credit.
    assert wallet.spent("USDF") == "1.08"


def test_auto_topup_from_threads_sharing_one_auth_buys_once(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account)
    auth = X402Auth(wallet, auto_topup="1", strict=True)
    barrier = threading.Barrier(4)
    with httpx.Client(base_url=gw.url, auth=auth, timeout=60) as http:

        def call(_: int) -> int:
            barrier.wait()
            return http.get(PAID).status_code

        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(call, range(4)))
    assert statuses == [200] * 4
    assert len(topups(gw, wallet.public_key)) == 1
    assert asyncio.run(gw.balance(wallet.public_key)) == 1_000_000 - 4 * PRICE
    assert chain.balance_of(account.address) == MINTED - 1_000_000


def test_auto_topup_buys_again_only_when_the_credit_runs_out(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account)
    before = balances(chain, account)
    sent = Sent()
    auth = X402Auth(wallet, auto_topup="1", strict=True, direct=False)
    with httpx.Client(base_url=gw.url, auth=auth, timeout=60, event_hooks=sent.hooks) as http:
        statuses = [http.get(DEAR).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    # 1 bought, 0.8 spent; the third request found 0.2 left and bought 1 more.
    assert len(topups(gw, wallet.public_key)) == 2
    assert balances(chain, account)[0] == before[0] - 2_000_000
    assert asyncio.run(gw.balance(wallet.public_key)) == 2_000_000 - 3 * DEAR_PRICE
    assert [path for _m, path, header in sent.requests if header == "payment-signature"] == [
        "/x402/topup",
        "/x402/topup",
    ]


def test_a_top_up_the_budget_cannot_cover_signs_nothing(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account, budget="0.5")
    before = balances(chain, account)
    auth = X402Auth(wallet, auto_topup="1")
    with (
        httpx.Client(base_url=gw.url, auth=auth, timeout=60) as http,
        pytest.raises(BudgetExceeded),
    ):
        http.get(PAID)
    assert balances(chain, account) == before
    lines = topup_lines(gw, wallet.public_key)
    assert [line["reason"] for line in lines] == ["payment_required"]  # priced, never paid
    assert wallet.spent("USDF") == "0"


def test_a_top_up_outside_the_gateways_limits_is_a_typed_error(
    gw: Stack, chain: AnvilChain
) -> None:
    wallet = Wallet(Identity.generate(), evm=agent_key(chain))
    with pytest.raises(TopUpFailed, match="1 to 1000 USDF") as failed:
        topup(gw.url, wallet, "0.5")
    assert failed.value.reason == "bad_request"
    assert topup_lines(gw, wallet.public_key) == []  # refused before asking


def test_the_sdk_topup_credits_a_fresh_key(gw: Stack, chain: AnvilChain) -> None:
    account = agent_key(chain)
    wallet = Wallet(Identity.generate(), evm=account)
    before = balances(chain, account)
    done = topup(gw.url + "/any/path", wallet, "2", strict=True)
    assert (done.payer, done.asset, done.credited, done.balance) == (
        wallet.public_key,
        "USDF",
        "2",
        "2",
    )
    assert done.verified and TX_HASH.match(done.transaction)
    assert balances(chain, account) == (before[0] - 2_000_000, before[1] + 2_000_000)
    assert asyncio.run(gw.balance(wallet.public_key)) == 2_000_000
    assert wallet.spent("USDF") == "2"


# -- x402 topup -----------------------------------------------------------------------------------


def run_x402(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("X402_WALLET", "X402_EVM"))}
    return subprocess.run(
        [X402, *args], capture_output=True, text=True, timeout=120, env={**clean, **(env or {})}
    )


def test_x402_topup_prints_the_balance_and_the_transaction(
    gw: Stack, chain: AnvilChain, tmp_path: Path
) -> None:
    account = agent_key(chain)
    agent = Identity.generate()
    agent.save(tmp_path / "agent.key")
    account.save(tmp_path / "agent.evm")
    before = balances(chain, account)
    result = run_x402(
        "topup", "--amount", "5", "--wallet", str(tmp_path / "agent.key"),
        "--evm-key", str(tmp_path / "agent.evm"), "--strict", gw.url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"credited 5 USDF to {agent.public_key}"
    assert lines[1] == "balance 5 USDF"
    transaction = lines[2].removeprefix("transaction ")
    assert TX_HASH.match(transaction)
    assert re.fullmatch(r"receipt rcpt_\S+ \(verified\)", lines[3])
    assert balances(chain, account) == (before[0] - 5_000_000, before[1] + 5_000_000)
    assert asyncio.run(gw.balance(agent.public_key)) == 5_000_000
    assert account.hex[2:] not in result.stdout + result.stderr

    # Both keys from the environment this time; the credit adds up.
    env = {"X402_WALLET": agent.seed_text, "X402_EVM_KEY": account.hex}
    again = run_x402("topup", "--amount", "1.5", gw.url, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1] == "balance 6.5 USDF"


def test_x402_pay_with_only_an_evm_key_pays_exact(
    gw: Stack, chain: AnvilChain, tmp_path: Path
) -> None:
    account = agent_key(chain)
    account.save(tmp_path / "agent.evm")
    before = balances(chain, account)
    result = run_x402("pay", "--evm-key", str(tmp_path / "agent.evm"), "--strict", gw.url + PAID)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["payer"].lower() == account.address.lower()
    err = result.stderr.splitlines()
    assert err[0].startswith("HTTP 200 OK · paid 0.01 USDF to gw_")
    assert err[1].endswith(f"(verified, GET {PAID})")
    assert TX_HASH.match(err[2].removeprefix("transaction "))
    assert balances(chain, account) == (before[0] - PRICE, before[1] + PRICE)


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--amount", "0.5"], "both", ["error: ", "1 to 1000 USDF"]),
        (["--amount", "five"], "both", ["error: ", "five"]),
        (["--amount", "5"], "ed25519", ["error: ", "EVM key"]),
        (["--amount", "5", "--payee", "gw_other"], "both", ["error: ", "guard payees"]),
    ],
    ids=["below-min", "not-an-amount", "no-evm-key", "payee-guard"],
)
def test_x402_topup_errors_are_one_line(
    gw: Stack, chain: AnvilChain, args: list[str], env: str, words: list[str]
) -> None:
    account = agent_key(chain)
    before = balances(chain, account)
    keys = {"X402_WALLET": Identity.generate().seed_text}
    if env == "both":
        keys["X402_EVM_KEY"] = account.hex
    result = run_x402("topup", *args, gw.url, env=keys)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    for word in words:
        assert word in result.stderr, result.stderr
    assert balances(chain, account) == before


# -- the README ----------------------------------------------------------------------------------


def test_the_readmes_self_funding_agent_runs_as_written(gw: Stack, chain: AnvilChain) -> None:
    text = README.read_text(encoding="utf-8")
    marker = "<!-- self-funding-snippet"
    found = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    assert found is not None
    account = agent_key(chain)
    agent = Identity.generate()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("X402_WALLET", "X402_EVM"))},
        "X402_WALLET": agent.seed_text,
        "X402_EVM_KEY": account.hex,
        "X402_GATEWAY": gw.url,
        "PYTHONWARNINGS": "error::UserWarning",  # a receipt warning fails the test
    }
    result = subprocess.run(
        [sys.executable, "-c", found.group(1)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 4.75\n"
    assert len(topups(gw, agent.public_key)) == 1
    assert chain.balance_of(account.address) == MINTED - 5_000_000
