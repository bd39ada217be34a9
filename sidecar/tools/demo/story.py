"""`x402 demo`'s story: an agent paying its way through the stack, step by step."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.table import Column, Table

from sidecar.agent.auth import X402Auth, receipt_of
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.errors import BudgetExceeded, MaxAmountExceeded
from sidecar.core.money import to_decimal
from sidecar.tools.demo.chain_lanes import OnchainLanes, onchain_rows
from sidecar.tools.demo.mcp_lane import McpLane
from sidecar.tools.demo.narration import Narration, Recorder
from sidecar.tools.demo.world import (
    ATLAS,
    BUDGET,
    CREDIT,
    EXPECTED_BALANCE,
    FREE_PATH,
    MAX_AMOUNT,
    ROUTES,
    OnchainStatus,
    short,
)
from sidecar.tools.mcp_stack import McpStack
from sidecar.tools.stack import Stack


class Demo(Narration):
    """The prepaid story on a running stack, then the on-chain lanes (chain_lanes.py)."""

    def __init__(
        self, stack: Stack, console: Console, onchain: OnchainStatus | None = None
    ) -> None:
        super().__init__(console)
        self.stack = stack
        self.onchain = onchain or OnchainStatus(skipped="no chain configured")
        self.recorder = Recorder()
        self.wallet = Wallet.generate(max_amount=MAX_AMOUNT, budget=BUDGET)
        self.discovery: dict[str, Any] = {}
        self.replayed: dict[str, Any] | None = None  # the proof step 3 paid with
        self.paid_receipt: str | None = None  # and the receipt it got

    def client(self, direct: bool) -> httpx.Client:
        auth = X402Auth(self.wallet, direct=direct, strict=True)
        hooks: dict[str, list[Callable[..., Any]]] = {
            "request": [self.recorder.on_request],
            "response": [self.recorder.on_response],
        }
        return httpx.Client(base_url=self.stack.url, auth=auth, event_hooks=hooks, timeout=10)

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
        if isinstance(self.stack, McpStack):  # the MCP server beside the demo service
            self.attempt("mcp tool paid", McpLane(self, self.stack).run)
        OnchainLanes(self, self.stack, self.onchain).run()
        return self.summary(self.onchain.skipped)

    def show_stack(self) -> None:
        stack = self.stack
        table = Table(box=box.SIMPLE, show_header=False)
        table.add_row("gateway (Envoy)", stack.url)
        table.add_row("Redis ledger", stack.redis_url)
        table.add_row(
            "sidecar", f"ext_authz gRPC :{stack.ports['grpc']}, HTTP :{stack.ports['http']}"
        )
        table.add_row("demo upstream", f"http://127.0.0.1:{stack.ports['upstream']}")
        onchain_rows(table, self.onchain.onchain)
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
        self.paid_receipt = response.headers.get("payment-response")

    def replay(self) -> None:
        self.step(
            "4. A retry",
            "The answer was lost: the agent resends the exact same X-Payment header.",
        )
        proof = self.replayed
        if proof is None:
            self.check("retry redelivered", False, "no proof to resend")
            return
        response = httpx.get(
            f"{self.stack.url}{ATLAS}",
            timeout=10,
            headers={"X-Payment": protocol.encode_header(proof)},
        )
        self.console.print(f"[bold]← {response.status_code}[/bold] the same receipt again")
        self.check(
            "retry redelivered",
            response.status_code == 200
            and response.headers.get("payment-response") == self.paid_receipt,
            "served again, charged nothing (at most 3 times; then 402 nonce_reused)",
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
        expected = ["free", "payment_required", "paid", "redelivered", "paid", "paid"]
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
