"""The demo's on-chain lanes (anvil with USDC, `x402 facilitator serve`): an agent that
tops up its own credit with USDC, an unmodified official x402 client paying `exact`, and
one paying a metered route with `upto` (a maximum signed, what was served settled)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
from rich import box
from rich.panel import Panel
from rich.table import Column, Table
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header

from sidecar.agent.auth import TOPUP_EXTENSION, X402Auth, receipt_of
from sidecar.agent.evm import EvmKey
from sidecar.agent.exact import TopUp
from sidecar.agent.wallet import Wallet
from sidecar.core.identity import Identity
from sidecar.tools.chain import AnvilChain
from sidecar.tools.demo.anchor_lane import AnchorLane
from sidecar.tools.demo.narration import Narration
from sidecar.tools.demo.world import (
    AGENT_USDC,
    ATLAS,
    CLIENT_USDC,
    EXACT_PRICE,
    PREPAID_PATHS,
    PREPAID_SPENT,
    ROW_PRICE,
    ROWS,
    ROWS_MAXIMUM,
    TOPUP_AMOUNT,
    TOPUP_ATOMIC,
    TX_HASH,
    DemoChain,
    OnchainStatus,
    new_evm_account,
    short,
    signed,
    to_atomic_usdf,
    usdc,
)
from sidecar.tools.onchain import official_client, upto_client
from sidecar.tools.stack import Stack


@dataclass
class SelfFunded:
    """What the self-funding agent's requests did: its top-ups, the chain's balances right
    after the top-up, and each request's (status, receipt verified, payer, amount)."""

    topups: list[TopUp] = field(default_factory=list)
    after_topup: tuple[int, int] | None = None
    paid: list[tuple[int, bool, str, str]] = field(default_factory=list)


def onchain_rows(table: Table, running: DemoChain | None) -> None:
    """The on-chain half's rows in the demo's table of what runs."""
    if running is None:
        return
    chain = running.chain
    table.add_row("chain (anvil)", f"{chain.rpc_url}, chain id {chain.chain_id}")
    table.add_row("USDC (FiatTokenV2_2)", f"{chain.token}, {chain.decimals} decimals")
    table.add_row("x402 facilitator", running.facilitator.url)
    table.add_row("operator (payTo)", running.pay_to)


def mined(chain: AnvilChain, transaction: str) -> bool:
    """Whether `transaction` is a transaction hash the chain mined successfully."""
    return bool(TX_HASH.match(transaction)) and (
        chain.w3.eth.get_transaction_receipt(transaction)["status"] == 1  # type: ignore[arg-type]
    )


class OnchainLanes:
    """The two on-chain lanes, told by the story's narration (its checks count)."""

    def __init__(self, story: Narration, stack: Stack, status: OnchainStatus) -> None:
        self.story, self.stack, self.status = story, stack, status

    def run(self) -> None:
        status = self.status
        if status.onchain is None:
            self.story.console.print()
            if status.error:
                self.story.check("on-chain lanes", False, status.error)
            else:
                self.story.console.print(
                    Panel(
                        f"[yellow]On-chain lanes skipped: {status.skipped}[/]\n"
                        "Install npm (e.g. apt-get install npm) and run x402 demo again to see "
                        "an agent top up with USDC and an x402 client pay with exact.",
                        expand=False,
                    )
                )
            return
        onchain = status.onchain
        self.story.attempt("self-funded top-up", lambda: self.self_funding_agent(onchain))
        self.story.attempt("exact payment", lambda: self.official_client_pays(onchain))
        self.story.attempt("upto payment", lambda: self.official_client_meters(onchain))
        lane = AnchorLane(self.story, self.stack)
        self.story.attempt("receipt proven on chain", lambda: lane.run(onchain))

    def self_funding_agent(self, onchain: DemoChain) -> None:
        chain = onchain.chain
        self.story.step(
            "A. An agent that funds itself",
            f"It holds an EVM key with {usdc(AGENT_USDC)} USDC on the chain (minted; no ETH: the "
            "facilitator pays the gas) and a fresh Ed25519 key the gateway has never seen.\n"
            f'X402Auth(wallet, auto_topup="{TOPUP_AMOUNT}"): the first prepaid proof is refused '
            f"(unknown_payer), so the SDK buys {TOPUP_AMOUNT} USDF of credit on "
            "POST /x402/topup, paying USDC with exact, and retries; every later request is a "
            "prepaid proof, nothing on chain.",
        )
        evm = EvmKey.generate()
        chain.mint(evm.address, AGENT_USDC)
        wallet = Wallet(Identity.generate(), evm=evm, budget="10")
        before = onchain.balances(evm.address)
        self.story.console.print(f"EVM address  {evm.address}")
        self.story.console.print(f"Ed25519 key  {wallet.public_key}")
        spent = self.pay_prepaid(onchain, wallet)
        after = onchain.balances(evm.address)
        self.balance_table(before, after)
        topups = spent.topups
        transaction = topups[0].transaction if topups else ""
        self.story.check(
            "self-funded top-up",
            len(topups) == 1
            and topups[0].verified
            and topups[0].payer == wallet.public_key
            and mined(chain, transaction)
            and after == (before[0] - TOPUP_ATOMIC, before[1] + TOPUP_ATOMIC)
            and spent.after_topup == after,
            f"one top-up, {TOPUP_AMOUNT} USDC moved on chain "
            f"({signed(after[0] - before[0])} agent, {signed(after[1] - before[1])} operator)",
        )
        paid = spent.paid
        total = sum(to_atomic_usdf(amount) for *_, amount in paid)
        self.story.check(
            "prepaid from the credit",
            all(
                status == 200 and ok and payer == wallet.public_key for status, ok, payer, _ in paid
            )
            and total == PREPAID_SPENT,
            f"{len(paid)} requests paid with prepaid proofs, {usdc(total)} USDF, "
            "verified receipts, no transaction",
        )
        ledger = asyncio.run(self.stack.balance(wallet.public_key))
        self.story.check(
            "ledger after top-up",
            ledger == TOPUP_ATOMIC - PREPAID_SPENT,
            f"balance {usdc(ledger)} USDF = {TOPUP_AMOUNT} topped up - {usdc(total)} spent",
        )

    def pay_prepaid(self, onchain: DemoChain, wallet: Wallet) -> SelfFunded:
        """The self-funding agent's requests: the first buys credit, all pay prepaid."""
        assert wallet.evm is not None
        spent = SelfFunded()
        auth = X402Auth(wallet, auto_topup=TOPUP_AMOUNT, strict=True)
        with httpx.Client(base_url=self.stack.url, auth=auth, timeout=60) as client:
            for path in PREPAID_PATHS:
                response = client.get(path)
                done = response.extensions.get(TOPUP_EXTENSION)
                if isinstance(done, TopUp):
                    spent.topups.append(done)
                    spent.after_topup = onchain.balances(wallet.evm.address)
                    self.story.console.print(
                        f"[bold]top-up[/bold] {done.credited} {done.asset} credited, "
                        f"transaction {done.transaction}, receipt {done.receipt_id} "
                        f"({'verified' if done.verified else 'NOT verified'})",
                        soft_wrap=True,
                    )
                receipt = receipt_of(response)
                amount = receipt.amount if receipt else "?"
                balance = receipt.balance if receipt else "?"
                verified = receipt is not None and receipt.verified
                payer = receipt.payer if receipt else ""
                spent.paid.append((response.status_code, verified, payer, amount))
                self.story.console.print(
                    f"GET {path} → {response.status_code}, prepaid proof {amount} USDF, "
                    f"ledger balance {balance}"
                )
        return spent

    def official_client_pays(self, onchain: DemoChain) -> None:
        chain = onchain.chain
        self.story.step(
            "B. Any x402 client pays with exact",
            "An unmodified official x402 client: x402HttpxClient with register_exact_evm_client "
            "and spend controls allowing the local USDC. The 402 offers prepaid and exact; it "
            "signs an EIP-3009 authorization for the price, the sidecar has the facilitator "
            "verify and settle it on chain, then lets the request through with a receipt.",
        )
        payer = new_evm_account()
        chain.mint(payer.address, CLIENT_USDC)
        before = onchain.balances(payer.address)
        client = official_client(chain, payer, EXACT_PRICE)

        async def pay() -> httpx.Response:
            async with x402HttpxClient(client, timeout=60) as http:
                answer: httpx.Response = await http.get(self.stack.url + ATLAS)
                return answer

        response = asyncio.run(pay())
        settled = decode_payment_response_header(response.headers.get("payment-response", ""))
        after = onchain.balances(payer.address)
        transaction = settled.transaction or ""
        self.story.console.print(f"payer        {payer.address}")
        self.story.console.print(
            f"GET {ATLAS} → {response.status_code}, paid with exact on {settled.network}"
        )
        self.story.console.print(f"transaction  {transaction}")
        self.story.console.print(json.dumps(response.json()), markup=False, soft_wrap=True)
        self.balance_table(before, after)
        self.story.check(
            "exact payment",
            response.status_code == 200
            and settled.success
            and settled.amount == str(EXACT_PRICE)
            and mined(chain, transaction),
            f"settled on chain, {settled.amount} atomic units, tx {short(transaction, 18)}",
        )
        self.story.check(
            "exact on chain",
            after == (before[0] - EXACT_PRICE, before[1] + EXACT_PRICE),
            f"payer {signed(after[0] - before[0])} USDC, operator {signed(after[1] - before[1])} "
            f"USDC: exactly the price, {usdc(EXACT_PRICE)}",
        )

    def official_client_meters(self, onchain: DemoChain) -> None:
        chain = onchain.chain
        self.story.step(
            "C. Any x402 wallet pays a metered route with upto",
            "The same official client with the standard upto scheme (UptoEvmScheme). The "
            f"402 of {ROWS} offers upto for the route's maximum, 100 rows: the wallet signs a "
            "Permit2 authorization of at most that, the facilitator verifies it, the service "
            "serves 37 rows, and only 37 x 0.001 settles on chain. This wallet holds USDC "
            "only (no approval to Permit2, no ETH): it also signs the token's EIP-2612 permit "
            "(the eip2612GasSponsoring extension the 402 declares), which the facilitator "
            "sends in the same transaction, paying the gas.",
        )
        payer = new_evm_account()
        chain.mint(payer.address, CLIENT_USDC)
        before = onchain.balances(payer.address)
        client = upto_client(chain.network, chain.token, payer.key, ROWS_MAXIMUM, chain.rpc_url)

        async def pay() -> httpx.Response:
            async with x402HttpxClient(client, timeout=60) as http:
                answer: httpx.Response = await http.get(
                    self.stack.url + ROWS, params={"limit": "37"}
                )
                return answer

        response = asyncio.run(pay())
        settled = decode_payment_response_header(response.headers.get("payment-response", ""))
        after = onchain.balances(payer.address)
        transaction = settled.transaction or ""
        used = 37 * ROW_PRICE
        self.story.console.print(f"payer        {payer.address}")
        self.story.console.print(
            f"GET {ROWS}?limit=37 → {response.status_code}, paid with upto on {settled.network}: "
            f"settled {usdc(used)} of {usdc(ROWS_MAXIMUM)} USDC signed"
        )
        self.story.console.print(f"transaction  {transaction}")
        self.balance_table(before, after)
        self.story.check(
            "upto payment",
            response.status_code == 200
            and settled.success
            and settled.amount == str(used)
            and mined(chain, transaction),
            f"37 rows settled on chain, {settled.amount} atomic units, tx {short(transaction, 18)}",
        )
        self.story.check(
            "upto on chain",
            after == (before[0] - used, before[1] + used),
            f"payer {signed(after[0] - before[0])} USDC, operator {signed(after[1] - before[1])} "
            f"USDC: what was served, not the maximum",
        )

    def balance_table(self, before: tuple[int, int], after: tuple[int, int]) -> None:
        table = Table(
            Column("USDC on chain", no_wrap=True),
            Column("before", justify="right"),
            Column("after", justify="right"),
            Column("change", justify="right"),
            box=box.SIMPLE,
        )
        for name, was, now in zip(("payer", "operator"), before, after, strict=True):
            table.add_row(name, usdc(was), usdc(now), signed(now - was))
        self.story.console.print(table)
