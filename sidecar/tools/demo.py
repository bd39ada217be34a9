"""`x402 demo`: the whole product on loopback, and an agent paying its way through it.

Starts a real Redis, the sidecar, the real Envoy and a small upstream (sidecar.stack),
creates and funds an agent wallet, then narrates: the price list, a 402 challenge, the
signed proof, the paid 200 with its verified receipt, a replay refused, direct payments
in one round trip, two spending guards refusing, the decision log and the ledger; then
paying for what was served: a failed call refunded and metered calls charged by usage.
Then the two on-chain lanes, with anvil + Circle's USDC and `x402 facilitator serve`
(sidecar.tools.chain, sidecar.tools.onchain): an agent holding only an EVM key tops up a
fresh Ed25519 key and pays prepaid from the credit; an unmodified official x402 client
pays a route with `exact`. The chain's tools are installed into a per-user cache on first
use; without npm the on-chain lanes are skipped, saying so.
Exit status 0 only if every step behaved as expected (or was skipped for want of npm).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Column, Table
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header

from sidecar.agent.auth import TOPUP_EXTENSION, X402Auth, receipt_of
from sidecar.agent.evm import EvmKey
from sidecar.agent.exact import TopUp
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.errors import BudgetExceeded, MaxAmountExceeded, ToolMissing, X402Error
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic, to_decimal
from sidecar.tools.chain import Chain, DevAccount, install_chain_tools, missing_chain_tools
from sidecar.tools.onchain import Facilitator, exact_settings, official_client, operator
from sidecar.tools.stack import Process, Stack

ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {
        "method": "GET",
        "path": "/api/v1/agent/pay-api/atlas",
        "price": "0.25",
        "description": "Atlas agent API, one call",
    },
    "trade-verify": {
        "method": "GET",
        "path": "/api/v1/trade/verify/{trade_id}",
        "price": "0.01",
        "description": "Verify one trade",
    },
    "market-signal": {
        "method": "GET",
        "path": "/api/v1/market/signal/{symbol}",
        "price": "0.0005",
        "description": "One market signal",
    },
    "atlas-deep-research": {
        "method": "POST",
        "path": "/api/v1/agent/pay-api/atlas/deep-research",
        "price": "5",
        "description": "Atlas deep research run",
    },
    # Charged for what was served (docs/protocol.md §12): a hold at the check, captured
    # at the response: usage x unit price, nothing if the service fails.
    "data-rows": {
        "method": "GET",
        "path": "/api/v1/data/rows",
        "unit": "row",
        "unit_price": "0.001",
        "max_units": 100,
        "description": "Data rows, 0.001 each",
    },
    "llm-generate": {
        "method": "POST",
        "path": "/api/v1/llm/generate",
        "unit": "token",
        "unit_price": "0.00001",
        "max_units": 4000,
        "description": "LLM generation, per token",
    },
}
FREE_PATH = "/api/v1/agents/discover"  # not in the price list: free
ATLAS = "/api/v1/agent/pay-api/atlas"
CREDIT = "10"
MAX_AMOUNT, BUDGET = "1.00", "0.50"
EXPECTED_BALANCE = "9.7395"  # 10 - 0.25 - 0.01 - 0.0005

# The on-chain lanes (USDF backed by the local chain's USDC, 6 decimals: 1 atomic = 1 atomic).
USDC = 1_000_000
TOPUP_MIN, TOPUP_MAX = "1", "50"
AGENT_USDC = 20 * USDC  # minted to the self-funding agent's EVM key
TOPUP_AMOUNT = "5"  # what it buys, once
TOPUP_ATOMIC = 5 * USDC
# What it then pays with prepaid proofs: 0.25 + 2 x 0.01 + 2 x 0.0005 = 0.271 USDF.
PREPAID_PATHS = [
    ATLAS,
    "/api/v1/trade/verify/T-2001",
    "/api/v1/trade/verify/T-2002",
    "/api/v1/market/signal/BTC-USD",
    "/api/v1/market/signal/ETH-USD",
]
PREPAID_SPENT = 271_000
CLIENT_USDC = 1 * USDC  # minted to the official client's key
EXACT_PRICE = 250_000  # atlas, 0.25 USDC
SERVE_CREDIT, SERVE_USDC = "100", 100 * USDC
TX_HASH = re.compile(r"^0x[0-9a-f]{64}$")


@dataclass
class Onchain:
    """The on-chain half of the demo, when it runs: anvil with USDC and the facilitator."""

    chain: Chain
    facilitator: Facilitator

    @property
    def processes(self) -> list[Process]:
        return [p for p in (self.chain.process, self.facilitator.process) if p is not None]

    @property
    def pay_to(self) -> str:
        return operator(self.chain).address

    def balances(self, address: str) -> tuple[int, int]:
        """(the payer's, the operator's) token balance, atomic units."""
        return self.chain.balance_of(address), self.chain.balance_of(self.pay_to)


@dataclass
class OnchainStatus:
    """What became of the on-chain half: running, skipped (no npm), or failed to start."""

    onchain: Onchain | None = None
    skipped: str = ""  # why the on-chain lanes are skipped (ToolMissing): exit status kept
    error: str = ""  # why they could not start: the demo fails
    installed: list[str] = field(default_factory=list)


def usdc(atomic: int) -> str:
    return to_decimal(atomic, 6)


def signed(atomic: int) -> str:
    return ("+" if atomic > 0 else "") + usdc(atomic)


@dataclass
class Exchange:
    """One HTTP request the agent's client sent, and what came back."""

    method: str
    path: str
    proof: dict[str, Any] | None
    status: int = 0
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Recorder:
    """httpx event hooks: every request the SDK sends, including its retries."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def on_request(self, request: httpx.Request) -> None:
        header = request.headers.get("x-payment")
        proof = protocol.decode_header(header) if header else None
        self.exchanges.append(Exchange(request.method, request.url.path, proof))

    def on_response(self, response: httpx.Response) -> None:
        response.read()
        exchange = self.exchanges[-1]
        exchange.status = response.status_code
        exchange.headers = dict(response.headers)
        try:
            exchange.body = response.json()
        except ValueError:
            exchange.body = response.text

    @contextmanager
    def call(self) -> Iterator[list[Exchange]]:
        """The exchanges of one SDK call."""
        start = len(self.exchanges)
        exchanges: list[Exchange] = []
        try:
            yield exchanges
        finally:
            exchanges.extend(self.exchanges[start:])


def short(text: str, keep: int = 12) -> str:
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # captured output: wide enough that tables do not wrap
        console = Console(highlight=False, width=110)
    return console


class Demo:
    def __init__(
        self, stack: Stack, console: Console, onchain: OnchainStatus | None = None
    ) -> None:
        self.stack = stack
        self.console = console
        self.onchain = onchain or OnchainStatus(skipped="no chain configured")
        self.results: list[tuple[str, bool, str]] = []
        self.recorder = Recorder()
        self.wallet = Wallet.generate(max_amount=MAX_AMOUNT, budget=BUDGET)
        self.discovery: dict[str, Any] = {}
        self.replayed: dict[str, Any] | None = None  # the proof step 3 paid with

    # -- narration helpers -----------------------------------------------------------------
    def step(self, title: str, text: str = "") -> None:
        self.console.print()
        self.console.print(
            Panel(
                text or title,
                title=f"[bold]{title}",
                title_align="left",
                box=box.ROUNDED,
                expand=False,
            )
        )

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        self.console.print(f"{mark} {name}" + (f" — {detail}" if detail else ""))
        return ok

    def client(self, direct: bool) -> httpx.Client:
        auth = X402Auth(self.wallet, direct=direct, strict=True)
        hooks: dict[str, list[Callable[..., Any]]] = {
            "request": [self.recorder.on_request],
            "response": [self.recorder.on_response],
        }
        return httpx.Client(base_url=self.stack.url, auth=auth, event_hooks=hooks, timeout=10)

    def attempt(self, name: str, action: Callable[[], None]) -> None:
        """Run one step; an unexpected exception fails it instead of ending the demo."""
        try:
            action()
        except Exception as exc:  # the demo reports it, then exits non-zero
            self.check(name, False, f"{exc.__class__.__name__}: {exc}")

    # -- the story -------------------------------------------------------------------------
    def run(self) -> int:
        self.show_stack()
        self.attempt("price list", self.price_list)
        self.attempt("free route", self.free_route)
        self.attempt("agent wallet", self.fund_wallet)
        with self.client(direct=False) as challenge_client:
            self.attempt("402 challenge", lambda: self.challenge(challenge_client))
        self.attempt("replay refused", self.replay)
        with self.client(direct=True) as direct_client:
            self.attempt("direct payment", lambda: self.direct(direct_client))
            self.attempt("guards", lambda: self.guards(direct_client))
        self.attempt("decision log", self.decision_log)
        self.attempt("ledger", self.ledger)
        self.attempt("refund", self.served)
        self.onchain_lanes()
        return self.summary()

    def show_stack(self) -> None:
        stack = self.stack
        table = Table(box=box.SIMPLE, show_header=False)
        table.add_row("gateway (Envoy)", stack.url)
        table.add_row("Redis ledger", stack.redis_url)
        table.add_row(
            "sidecar", f"ext_authz gRPC :{stack.ports['grpc']}, HTTP :{stack.ports['http']}"
        )
        table.add_row("demo upstream", f"http://127.0.0.1:{stack.ports['upstream']}")
        self.onchain_rows(table)
        self.step(
            "x402 demo",
            "Real Redis, the x402 sidecar, real Envoy and a demo service, all on loopback"
            + (
                ", with anvil, Circle's USDC and an x402 facilitator."
                if self.onchain.onchain
                else "."
            ),
        )
        self.console.print(table)

    def price_list(self) -> None:
        self.step("1. The price list", "Free: GET /.well-known/x402")
        response = httpx.get(self.stack.url + protocol.DISCOVERY_PATH, timeout=10)
        self.discovery = response.json()
        # No wrapping: a path or a price cut in two is harder to read than a narrow table.
        table = Table(
            Column("route", no_wrap=True),
            Column("price", no_wrap=True, justify="right"),
            box=box.SIMPLE,
        )
        for route in self.discovery.get("routes", []):
            price = f"{route['price']} {route['asset']}"
            if "unit_price" in route:
                price = f"{route['unit_price']} per {route['unit']}, up to {price}"
            table.add_row(f"{route['method']} {route['path']}", price)
        self.console.print(table)
        self.console.print(
            f"payee {self.discovery.get('payee')}, receipts signed by key "
            f"{self.discovery['keys'][0]['kid']}"
        )
        self.check(
            "price list",
            response.status_code == 200 and len(self.discovery.get("routes", [])) == len(ROUTES),
            f"{len(self.discovery.get('routes', []))} priced routes",
        )

    def free_route(self) -> None:
        response = httpx.get(f"{self.stack.url}{FREE_PATH}", timeout=10)
        self.check(
            "free route",
            response.status_code == 200,
            f"GET {FREE_PATH} → {response.status_code} without paying",
        )

    def fund_wallet(self) -> None:
        self.step(
            "2. An agent wallet",
            "An Ed25519 key (x402 keygen) with spending guards: at most "
            f"{MAX_AMOUNT} USDF per request, {BUDGET} USDF in total.",
        )
        balance = asyncio.run(self.stack.fund(self.wallet.public_key, CREDIT))
        self.console.print(f"payer   {self.wallet.public_key}")
        self.console.print(f"credit  {CREDIT} USDF (x402 payer register + x402 payer credit)")
        self.check("agent wallet", balance == 10_000_000, f"registered and funded, {CREDIT} USDF")

    def challenge(self, client: httpx.Client) -> None:
        self.step(
            "3. Pay on a 402",
            "httpx.get(url, auth=X402Auth(wallet)): the agent reads "
            "the 402, signs a proof and retries, by itself.",
        )
        with self.recorder.call() as exchanges:
            response = client.get(ATLAS)
        sent = [e for e in exchanges if e.path == ATLAS]
        if len(sent) != 2 or not isinstance(sent[0].body, dict):
            self.check("402 challenge", False, f"{len(sent)} requests to the route, not 2")
            return
        first, paid = sent
        invoice = first.body.get("x402", {})
        required = protocol.decode_header(first.headers.get("payment-required", ""))
        accepts = required["accepts"][0]
        self.console.print(
            f"[bold]→ GET {ATLAS}[/bold] without a proof\n"
            f"[bold]← {first.status}[/bold] {first.body.get('error')}: "
            f"{first.body.get('message')}"
        )
        table = Table(box=box.SIMPLE, show_header=False)
        for name in ("invoice_id", "amount", "asset", "resource", "payee", "nonce"):
            table.add_row(name, str(invoice.get(name)))
        table.add_row(
            "expires_at",
            f"{invoice.get('expires_at')} (in {invoice.get('expires_at', 0) - int(time.time())} s)",
        )
        table.add_row(
            "PAYMENT-REQUIRED",
            f"x402Version {required['x402Version']}, "
            f"{accepts['amount']} atomic {accepts['asset']} to {accepts['payTo']}",
        )
        self.console.print(table)
        self.check(
            "402 challenge",
            first.status == 402
            and first.body.get("error") == "payment_required"
            and invoice.get("amount") == "0.25"
            and accepts["amount"] == "250000",
            "an invoice in the body and in PAYMENT-REQUIRED (x402 v2)",
        )
        proof = paid.proof or {}
        self.console.print("[bold]→ retry[/bold] with X-Payment: the signed proof")
        table = Table(box=box.SIMPLE, show_header=False)
        for name in ("invoice_id", "nonce", "amount", "payer", "signature"):
            table.add_row(name, short(str(proof.get(name)), 24))
        self.console.print(table)
        self.check(
            "signed proof",
            proof.get("invoice_id") == invoice.get("invoice_id")
            and proof.get("payer") == self.wallet.public_key,
            "Ed25519 over the invoice terms",
        )
        receipt = receipt_of(response)
        body = response.json()
        self.console.print(f"[bold]← {response.status_code}[/bold] from the service:")
        self.console.print(json.dumps(body), markup=False, soft_wrap=True)
        self.check(
            "paid 200",
            response.status_code == 200
            and body.get("payer") == self.wallet.public_key
            and body.get("proof_header_seen") is False,
            "the service saw the payer, never the proof",
        )
        if receipt is None:
            self.check("verified receipt", False, "no receipt on the response")
            return
        table = Table(box=box.SIMPLE, show_header=False)
        for name in ("receipt_id", "amount", "asset", "balance", "resource", "kid"):
            table.add_row(name, str(getattr(receipt, name)))
        self.console.print(table)
        self.check(
            "verified receipt",
            receipt.verified and receipt.amount == "0.25",
            f"{receipt.receipt_id} signed by {receipt.kid}, balance {receipt.balance}",
        )
        self.replayed = paid.proof

    def replay(self) -> None:
        self.step("4. A replay", "Someone resends the exact same X-Payment header.")
        proof = self.replayed
        if proof is None:
            self.check("replay refused", False, "no proof to replay")
            return
        response = httpx.get(
            f"{self.stack.url}{ATLAS}",
            timeout=10,
            headers={"X-Payment": protocol.encode_header(proof)},
        )
        reason = response.json().get("error")
        self.console.print(
            f"[bold]← {response.status_code}[/bold] {reason}: {response.json().get('message')}"
        )
        self.check(
            "replay refused",
            response.status_code == 402 and reason == "nonce_reused",
            "402 nonce_reused, nothing charged",
        )

    def direct(self, client: httpx.Client) -> None:
        self.step(
            "5. Pay in one round trip",
            "With the price list, X402Auth signs before sending: no 402 at all.",
        )
        ok = True
        for path in ("/api/v1/trade/verify/T-1001", "/api/v1/market/signal/BTC-USD"):
            with self.recorder.call() as exchanges:
                response = client.get(path)
            to_route = [e for e in exchanges if e.path == path]
            receipt = receipt_of(response)
            paid = receipt.amount if receipt else "?"
            verified = "verified" if receipt and receipt.verified else "NOT verified"
            self.console.print(
                f"GET {path} → {response.status_code}, {len(to_route)} request, "
                f"paid {paid} USDF, receipt {verified}"
            )
            ok = ok and response.status_code == 200 and len(to_route) == 1
            ok = ok and receipt is not None and receipt.verified and not receipt.invoice_id
        self.check("direct payment", ok, "one HTTP request per paid call, receipts verified")

    def guards(self, client: httpx.Client) -> None:
        self.step("6. Spending guards", "Checked before anything is signed.")
        before = len(self.recorder.exchanges)
        try:
            client.post("/api/v1/agent/pay-api/atlas/deep-research", json={"topic": "agents"})
        except MaxAmountExceeded as exc:
            self.console.print(f"[bold]refused[/bold] {exc}")
            self.check(
                "max_amount guard",
                len(self.recorder.exchanges) == before,
                f"a {ROUTES['atlas-deep-research']['price']} USDF call, nothing signed or sent",
            )
        else:
            self.check("max_amount guard", False, "the expensive call was not refused")
        try:
            client.get(ATLAS)
        except BudgetExceeded as exc:
            self.console.print(f"[bold]refused[/bold] {exc}")
            self.check(
                "budget guard",
                len(self.recorder.exchanges) == before,
                f"spent {self.wallet.spent()} of {BUDGET} USDF; another 0.25 would overspend",
            )
        else:
            self.check("budget guard", False, "the call over budget was not refused")

    def decision_log(self) -> None:
        self.step("7. The decision log", "One JSON line per check, from the sidecar.")
        deadline = time.monotonic() + 3
        while True:  # the sidecar writes its log asynchronously; wait for the last line
            decisions = self.stack.decisions()
            if (
                sum(d.get("reason") == "paid" for d in decisions) >= 3
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.05)
        table = Table(
            Column("status", no_wrap=True),
            Column("reason", no_wrap=True),
            Column("route", no_wrap=True),
            Column("price", no_wrap=True),
            Column("balance", no_wrap=True),
            box=box.SIMPLE,
        )
        for d in decisions:
            table.add_row(
                str(d.get("status")),
                d.get("reason"),
                f"{d.get('method')} {d.get('route') or d.get('path')}",
                d.get("price") or "",
                d.get("balance") or "",
            )
        self.console.print(table)
        if decisions:
            self.console.print("a raw line:")
            self.console.print(json.dumps(decisions[-1]), soft_wrap=True, markup=False)
        reasons = [d.get("reason") for d in decisions]
        expected = ["free", "payment_required", "paid", "nonce_reused", "paid", "paid"]
        self.check("decision log", reasons == expected, ", ".join(map(str, reasons)))

    def ledger(self) -> None:
        balance = asyncio.run(self.stack.balance(self.wallet.public_key))
        shown = to_decimal(balance, 6)
        self.check(
            "ledger",
            shown == EXPECTED_BALANCE,
            f"balance {shown} USDF = {CREDIT} - 0.25 - 0.01 - 0.0005; "
            f"the wallet counted {self.wallet.spent()} spent",
        )

    def served(self) -> None:
        self.step(
            "8. Pay for what was served",
            "Metered routes hold the quoted maximum at the check and capture what the\n"
            "service reports (x402-usage) at the response; a failed call is refunded.",
        )
        wallet = Wallet.generate(max_amount="0.1", budget="1")
        asyncio.run(self.stack.fund(wallet.public_key, "1"))
        auth = X402Auth(wallet, strict=True)
        with httpx.Client(base_url=self.stack.url, auth=auth, timeout=10) as client:
            failed = client.get("/api/v1/data/rows", params={"limit": "37", "fail": "500"})
            refund = receipt_of(failed)
            self.console.print(
                f"GET /api/v1/data/rows?limit=37 → {failed.status_code} (the service failed), "
                f"charged {refund.amount if refund else '?'} of "
                f"{refund.held if refund else '?'} held"
            )
            self.check(
                "refund",
                failed.status_code == 500
                and refund is not None
                and refund.verified
                and not refund.success
                and wallet.spent() == "0",
                "a signed receipt says nothing was charged; the proof may be retried",
            )
            rows = client.get("/api/v1/data/rows", params={"limit": "37"})
            tokens = client.post("/api/v1/llm/generate", json={"prompt": "hi", "max_tokens": 120})
        ok = True
        for response, what in ((rows, "rows"), (tokens, "tokens")):
            receipt = receipt_of(response)
            if receipt is None:
                ok = False
                continue
            self.console.print(
                f"{response.request.method} {response.request.url.path} → "
                f"{response.status_code}, {receipt.units} {what}: charged {receipt.amount} "
                f"of {receipt.held} USDF held, receipt "
                f"{'verified' if receipt.verified else 'NOT verified'}"
            )
            ok = ok and response.status_code == 200 and receipt.verified
        balance = to_decimal(asyncio.run(self.stack.balance(wallet.public_key)), 6)
        self.check(
            "metered charge",
            ok and wallet.spent() == "0.0382" and balance == "0.9618",
            f"37 rows x 0.001 + 120 tokens x 0.00001 = 0.0382 USDF; balance {balance}",
        )

    # -- the on-chain lanes (USDC on anvil, `x402 facilitator serve`) ------------------------
    def onchain_rows(self, table: Table) -> None:
        running = self.onchain.onchain
        if running is None:
            return
        chain = running.chain
        table.add_row("chain (anvil)", f"{chain.rpc_url}, chain id {chain.chain_id}")
        table.add_row("USDC (FiatTokenV2_2)", f"{chain.token}, {chain.decimals} decimals")
        table.add_row("x402 facilitator", running.facilitator.url)
        table.add_row("operator (payTo)", running.pay_to)

    def onchain_lanes(self) -> None:
        status = self.onchain
        if status.onchain is None:
            self.console.print()
            if status.error:
                self.check("on-chain lanes", False, status.error)
            else:
                self.console.print(
                    Panel(
                        f"[yellow]On-chain lanes skipped: {status.skipped}[/]\n"
                        "Install npm (e.g. apt-get install npm) and run x402 demo again to see "
                        "an agent top up with USDC and an x402 client pay with exact.",
                        expand=False,
                    )
                )
            return
        onchain = status.onchain
        self.attempt("self-funded top-up", lambda: self.self_funding_agent(onchain))
        self.attempt("exact payment", lambda: self.official_client_pays(onchain))

    def self_funding_agent(self, onchain: Onchain) -> None:
        chain = onchain.chain
        self.step(
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
        self.console.print(f"EVM address  {evm.address}")
        self.console.print(f"Ed25519 key  {wallet.public_key}")
        topups: list[TopUp] = []
        paid: list[tuple[int, bool, str, str]] = []  # status, verified, payer, amount
        auth = X402Auth(wallet, auto_topup=TOPUP_AMOUNT, strict=True)
        after_topup: tuple[int, int] | None = None
        with httpx.Client(base_url=self.stack.url, auth=auth, timeout=60) as client:
            for path in PREPAID_PATHS:
                response = client.get(path)
                done = response.extensions.get(TOPUP_EXTENSION)
                if isinstance(done, TopUp):
                    topups.append(done)
                    after_topup = onchain.balances(evm.address)
                    self.console.print(
                        f"[bold]top-up[/bold] {done.credited} {done.asset} credited, "
                        f"transaction {done.transaction}, receipt {done.receipt_id} "
                        f"({'verified' if done.verified else 'NOT verified'})",
                        soft_wrap=True,
                    )
                receipt = receipt_of(response)
                amount = receipt.amount if receipt else "?"
                balance = receipt.balance if receipt else "?"
                paid.append(
                    (
                        response.status_code,
                        receipt is not None and receipt.verified,
                        receipt.payer if receipt else "",
                        amount,
                    )
                )
                self.console.print(
                    f"GET {path} → {response.status_code}, prepaid proof {amount} USDF, "
                    f"ledger balance {balance}"
                )
        after = onchain.balances(evm.address)
        self.balance_table(before, after)
        transaction = topups[0].transaction if topups else ""
        mined = bool(TX_HASH.match(transaction)) and (
            chain.w3.eth.get_transaction_receipt(transaction)["status"] == 1  # type: ignore[arg-type]
        )
        self.check(
            "self-funded top-up",
            len(topups) == 1
            and topups[0].verified
            and topups[0].payer == wallet.public_key
            and mined
            and after == (before[0] - TOPUP_ATOMIC, before[1] + TOPUP_ATOMIC)
            and after_topup == after,
            f"one top-up, {TOPUP_AMOUNT} USDC moved on chain "
            f"({signed(after[0] - before[0])} agent, {signed(after[1] - before[1])} operator)",
        )
        spent = sum(to_atomic_usdf(amount) for *_, amount in paid)
        self.check(
            "prepaid from the credit",
            all(
                status == 200 and ok and payer == wallet.public_key for status, ok, payer, _ in paid
            )
            and spent == PREPAID_SPENT,
            f"{len(paid)} requests paid with prepaid proofs, {usdc(spent)} USDF, "
            "verified receipts, no transaction",
        )
        ledger = asyncio.run(self.stack.balance(wallet.public_key))
        self.check(
            "ledger after top-up",
            ledger == TOPUP_ATOMIC - PREPAID_SPENT,
            f"balance {usdc(ledger)} USDF = {TOPUP_AMOUNT} topped up - {usdc(spent)} spent",
        )

    def official_client_pays(self, onchain: Onchain) -> None:
        chain = onchain.chain
        self.step(
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
        self.console.print(f"payer        {payer.address}")
        self.console.print(
            f"GET {ATLAS} → {response.status_code}, paid with exact on {settled.network}"
        )
        self.console.print(f"transaction  {transaction}")
        self.console.print(json.dumps(response.json()), markup=False, soft_wrap=True)
        self.balance_table(before, after)
        mined = bool(TX_HASH.match(transaction)) and (
            chain.w3.eth.get_transaction_receipt(transaction)["status"] == 1  # type: ignore[arg-type]
        )
        self.check(
            "exact payment",
            response.status_code == 200 and settled.success and mined,
            f"settled on chain, transaction {short(transaction, 18)}",
        )
        self.check(
            "exact on chain",
            after == (before[0] - EXACT_PRICE, before[1] + EXACT_PRICE),
            f"payer {signed(after[0] - before[0])} USDC, operator {signed(after[1] - before[1])} "
            f"USDC: exactly the price, {usdc(EXACT_PRICE)}",
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
        self.console.print(table)

    def summary(self) -> int:
        failed = [name for name, ok, _ in self.results if not ok]
        self.console.print()
        if failed:
            self.console.print(
                Panel(
                    f"[red]{len(failed)} of {len(self.results)} steps "
                    f"misbehaved: {', '.join(failed)}",
                    expand=False,
                )
            )
            return 1
        skipped = (
            f"\n[yellow]The on-chain lanes were skipped: {self.onchain.skipped}[/]"
            if self.onchain.skipped
            else ""
        )
        self.console.print(
            Panel(
                f"[green]All {len(self.results)} steps behaved as expected.[/]{skipped}"
                "\nNext: x402 demo --serve, then pay with your own agent.",
                expand=False,
            )
        )
        return 0


def new_evm_account() -> DevAccount:
    """A fresh EVM key as the chain helpers take it (address, hex key)."""
    key = EvmKey.generate()
    return DevAccount(key.account.address, key.hex)


def to_atomic_usdf(amount: str) -> int:
    try:
        return to_atomic(amount, 6)
    except X402Error:
        return -1


def run(serve: bool = False, console: Console | None = None, info: Path | None = None) -> int:
    console = console or make_console()
    # SIGTERM stops what was started, as Ctrl-C does (serve_forever takes it over); signal
    # handlers belong to the main thread.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        with contextlib.ExitStack() as running:
            onchain = start_onchain(running, console)
            settings: dict[str, Any] = {}
            if onchain.onchain is not None:
                settings = exact_settings(
                    onchain.onchain.chain,
                    onchain.onchain.facilitator,
                    topup_min=TOPUP_MIN,
                    topup_max=TOPUP_MAX,
                )
            with console.status("starting Redis, the sidecar, Envoy and the demo service…"):
                stack = Stack(ROUTES, settings=settings)
                token = stack.with_admin() if serve else ""  # --serve: the dashboard too
                running.enter_context(stack)
            if serve:
                return serve_forever(stack, console, onchain, info, token)
            return Demo(stack, console, onchain).run()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM during the story: everything is stopped
        console.print("interrupted", markup=False)
        return 130
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def start_onchain(running: contextlib.ExitStack, console: Console) -> OnchainStatus:
    """anvil with USDC and `x402 facilitator serve`, stopped by `running`; the chain's tools
    are installed into the per-user cache first if they are nowhere to be found."""
    installed: list[str] = []
    try:
        if missing_chain_tools():
            with console.status("installing the local chain's tools (once)…") as spinner:

                def report(what: str) -> None:
                    console.print(f"[bold]installing[/bold] {what} (once)", soft_wrap=True)
                    spinner.update(f"installing {what}…")

                installed = install_chain_tools(report)
        with console.status("starting anvil with USDC and the x402 facilitator…"):
            workdir = Path(running.enter_context(tempfile.TemporaryDirectory(prefix="x402-")))
            chain = running.enter_context(Chain(workdir=workdir))
            facilitator = Facilitator(chain, workdir)
            running.callback(facilitator.stop)
            facilitator.start()
    except ToolMissing as exc:
        console.print(f"[yellow]on-chain lanes skipped:[/] {exc}")
        return OnchainStatus(skipped=str(exc))
    except Exception as exc:  # reported as a failed step; the prepaid lanes still run
        console.print(f"[red]the local chain did not start:[/] {exc}", soft_wrap=True)
        return OnchainStatus(error=f"{exc.__class__.__name__}: {exc}")
    return OnchainStatus(Onchain(chain, facilitator), installed=installed)


def serve_forever(
    stack: Stack,
    console: Console,
    onchain: OnchainStatus | None = None,
    info: Path | None = None,
    token: str = "",
) -> int:
    """Keep the stack up for the user's own agent until Ctrl-C or SIGTERM; with `info`,
    write what a client needs there (mode 0600), removed again on the way out; with
    `token`, the operator's dashboard is served behind it."""
    onchain = onchain or OnchainStatus(skipped="no chain configured")
    wallet = Wallet.generate()
    key_file = stack.dir / "agent.key"
    wallet.identity.save(key_file)
    asyncio.run(stack.fund(wallet.public_key, SERVE_CREDIT))
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_row("gateway", stack.url)
    table.add_row("price list", stack.url + protocol.DISCOVERY_PATH)
    table.add_row("Redis", stack.redis_url)
    table.add_row("agent wallet", f"{key_file} ({SERVE_CREDIT} USDF)")
    facts = serve_facts(stack, wallet, key_file, onchain)
    serve_chain_rows(table, facts)
    if token:
        table.add_row("dashboard", stack.dashboard_url)
        table.add_row("admin token", token)
    console.print(Panel(table, title="x402 demo --serve", title_align="left", expand=False))
    console.print("Try it:", markup=False)
    console.print(
        f"  export X402_GATEWAY={stack.url} X402_WALLET_FILE={key_file} "
        f"REDIS_URL={stack.redis_url}\n"
        f"  x402 pay $X402_GATEWAY{ATLAS}\n"
        f'  x402 pay --max-amount 5 -X POST -d \'{{"topic": "agents"}}\' '
        f"$X402_GATEWAY/api/v1/agent/pay-api/atlas/deep-research\n"
        f"  x402 payer balance {wallet.public_key}\n"
        "  python - <<'EOF'\n"
        "import os, httpx\n"
        "from sidecar.agent import Wallet, X402Auth, receipt_of, refusal_of\n"
        'auth = X402Auth(Wallet.from_env(max_amount="1.00", budget="10"))\n'
        f'r = httpx.get(os.environ["X402_GATEWAY"] + "{ATLAS}", auth=auth)\n'
        "print(r.status_code, r.json(), receipt_of(r) or refusal_of(r))\n"
        "EOF",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    serve_chain_snippets(console, facts)
    watched = [*stack.processes.values()]
    if onchain.onchain is not None:
        watched += onchain.onchain.processes
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        if info is not None:
            facts["processes"] = {p.name: p.popen.pid for p in watched}
            write_info(info, facts)
            console.print(f"Everything above is in {info} (JSON, mode 0600).", markup=False)
        console.print("Ctrl-C stops everything.", markup=False)
        while not stop.wait(0.5):
            dead = [p.name for p in watched if p.popen.poll() is not None]
            if dead:
                raise X402Error(f"{', '.join(dead)} exited; see the logs in {stack.dir}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if info is not None:
            with contextlib.suppress(FileNotFoundError):
                info.unlink()
    console.print("stopping…", markup=False)
    return 0


def serve_facts(
    stack: Stack, wallet: Wallet, key_file: Path, onchain: OnchainStatus
) -> dict[str, Any]:
    """What a client needs to try the gateway (the --info file); with the chain, a fresh
    EVM key holding minted USDC, also saved to a file (0600) beside the wallet."""
    facts: dict[str, Any] = {
        "gateway_url": stack.url,
        "discovery_url": stack.url + protocol.DISCOVERY_PATH,
        "redis_url": stack.redis_url,
        "asset": "USDF",
        "wallet_file": str(key_file),
        "wallet_public_key": wallet.public_key,
        "wallet_balance": SERVE_CREDIT,
        "routes": {name: dict(spec) for name, spec in ROUTES.items()},
    }
    running = onchain.onchain
    chain_keys = (
        "chain_rpc_url", "chain_id", "network", "token_address", "token_symbol",
        "token_decimals", "facilitator_url", "pay_to", "topup_url", "evm_private_key",
        "evm_address", "evm_key_file", "evm_balance",
    )  # fmt: skip
    facts.update(dict.fromkeys(chain_keys))
    facts["onchain_skipped"] = onchain.skipped or onchain.error or None
    if running is None:
        return facts
    chain = running.chain
    evm = EvmKey.generate()
    chain.mint(evm.address, SERVE_USDC)
    evm_file = stack.dir / "agent.evm"
    evm.save(evm_file)
    facts.update(
        {
            "chain_rpc_url": chain.rpc_url,
            "chain_id": chain.chain_id,
            "network": chain.network,
            "token_address": chain.token,
            "token_symbol": "USDC",
            "token_decimals": chain.decimals,
            "facilitator_url": running.facilitator.url,
            "pay_to": running.pay_to,
            "topup_url": stack.url + "/x402/topup",
            "evm_private_key": evm.hex,
            "evm_address": evm.address,
            "evm_key_file": str(evm_file),
            "evm_balance": usdc(SERVE_USDC),
        }
    )
    return facts


def serve_chain_rows(table: Table, facts: dict[str, Any]) -> None:
    if facts["chain_rpc_url"] is None:
        table.add_row("on-chain lanes", f"skipped: {facts['onchain_skipped']}")
        return
    table.add_row("chain RPC", f"{facts['chain_rpc_url']} (chain id {facts['chain_id']})")
    table.add_row("USDC token", f"{facts['token_address']} ({facts['token_decimals']} decimals)")
    table.add_row("facilitator", facts["facilitator_url"])
    table.add_row("operator (payTo)", facts["pay_to"])
    table.add_row("top-up route", f"POST {facts['topup_url']}")
    table.add_row("EVM key", f"{facts['evm_key_file']} ({facts['evm_balance']} USDC)")
    table.add_row("EVM address", facts["evm_address"])


def serve_chain_snippets(console: Console, facts: dict[str, Any]) -> None:
    if facts["chain_rpc_url"] is None:
        return
    console.print(
        f"  export X402_EVM_KEY_FILE={facts['evm_key_file']}\n"
        "  x402 topup --amount 5 $X402_GATEWAY   # 5 USDF of credit for the wallet, paid in USDC",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def write_info(path: Path, facts: dict[str, Any]) -> None:
    """`facts` as one JSON object in `path`, mode 0600 (it holds private keys), replaced
    atomically so a reader never sees half of it."""
    path = path.absolute()
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(facts, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
