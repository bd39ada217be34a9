"""The conservation-of-money workload: credits (some retried), paid requests from
concurrent payers, replays, expired proofs and suspensions through the real servicer; so
do routes charged on success and metered ones, through the real response phase
(server/processing/) with random statuses and usage reports, and holds whose response
phase never runs (the worker was killed). Then, after the holds' lifetime, every invariant
is checked against the ledger: credited = balance + captured (debited), no hold left,
receipts = captures (tests/test_conservation.py, and on Redis Cluster
tests/test_cluster.py). Payers also open their own channels (self-serve, some requests
replayed), pay vouchers and close them, concurrently with everything else: nothing stays
channeled, and each close is one receipt of exactly what its vouchers raised."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.core import channel_requests, phases, protocol, vouchers
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic, to_decimal
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import ACTIVE, SUSPENDED, Ledger
from sidecar.ledger.channels import Channels
from sidecar.ledger.holds import Holds
from sidecar.server.authz.check import CheckService
from sidecar.server.authz.grpc_transport import check_message
from sidecar.server.channel_config import ChannelTerms
from sidecar.server.envoy import contract
from sidecar.server.processing.http_transport import HttpProcessor
from sidecar.server.processing.phase import Processor
from sidecar.server.self_channels import SelfChannels
from sidecar.tools.stack import Stack
from tests.support.inprocess import check, check_request, outcome, servicer_for
from tests.support.streams import raw, xrange

PAYERS = 24
BATCH = 16  # operations in flight at once
PRICES = {
    "/api/v1/agent/pay-api/atlas": ("0.25", 250_000),
    "/api/v1/trade/verify/T-{n}": ("0.01", 10_000),
    "/api/v1/market/signal": ("0.0005", 500),
}
HOLD_SECONDS = 2
# Routes charged on success, as Envoy annotates them (the renderer's context_extensions).
HELD_ROUTES = {
    "/api/v1/report": (
        "0.25",
        {"x402.route": "report", "x402.price": "0.25", "x402.charge": "on_success"},
    ),
    "/api/v1/data/rows": (
        "0.1",
        {
            "x402.route": "rows",
            "x402.unit": "row",
            "x402.unit_price": "0.001",
            "x402.max_units": "100",
            "x402.usage_missing": "minimum",
            "x402.min_units": "3",
        },
    ),
}
for _price, _extensions in HELD_ROUTES.values():
    _extensions.update(
        {phases.EXT_PHASE: phases.PHASE_RESPONSE, "x402.hold_seconds": str(HOLD_SECONDS)}
    )


@dataclass
class Books:
    """What the clients saw; the ledger must agree with it to the unit."""

    credited: Counter[str] = field(default_factory=Counter)
    receipts: dict[str, tuple[str, int]] = field(default_factory=dict)  # id → payer, amount
    spent_proofs: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    credit_keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    released: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # retry
    # payer, path, proof headers, receipt id, the body kept for its retries (None: none)
    captured: list[tuple[str, str, dict[str, str], str, bytes | None]] = field(default_factory=list)
    open_channels: list[tuple[str, str]] = field(default_factory=list)  # payer, channel id


class Workload:
    def __init__(
        self, stack: Stack, servicer: CheckService, ledger: Ledger, rng: random.Random
    ) -> None:
        self.stack, self.servicer, self.ledger, self.rng = stack, servicer, ledger, rng
        self.payers = [Identity.generate() for _ in range(PAYERS)]
        self.books = Books()
        self.processor = HttpProcessor(Processor(servicer.routes, servicer.gateway, ledger))
        assets = servicer.routes.assets
        terms = ChannelTerms.from_mapping({}, assets, "USDF")
        assert terms is not None
        self.side = SelfChannels(servicer.gateway, ledger, terms, assets)

    def proof(self, payer: Identity, path: str, amount: str, ttl: int) -> dict[str, str]:
        payee, expires_at = self.stack.gateway_identity.kid, int(time.time()) + ttl
        terms = protocol.direct_terms(f"GET {path}", "USDF", amount, payee, expires_at)
        return {"x-payment": protocol.encode_header(protocol.sign_proof(terms, payer))}

    async def credit(self) -> None:
        payer = self.rng.choice(self.payers)
        if self.books.credit_keys and self.rng.random() < 0.3:  # a retried top-up
            key, (payer_key, amount) = self.rng.choice(list(self.books.credit_keys.items()))
            result = await self.ledger.credit(payer_key, "USDF", amount, key)
            assert not result.applied
            self.books.outcomes["credit_retry"] += 1
            return
        amount, key = self.rng.randint(1, 3_000_000), f"k{self.rng.getrandbits(64)}"
        self.books.credit_keys[key] = (payer.public_key, amount)
        result = await self.ledger.credit(payer.public_key, "USDF", amount, key)
        assert result.applied
        self.books.credited[payer.public_key] += amount
        self.books.outcomes["credit"] += 1

    async def pay(self) -> None:
        payer = self.rng.choice(self.payers)
        template = self.rng.choice(list(PRICES))
        amount, atomic = PRICES[template]
        path = template.format(n=self.rng.randint(1, 50))
        headers = self.proof(payer, path, amount, ttl=120)
        result = await check(self.servicer, check_request("GET", path, headers))
        self.books.outcomes[result.reason] += 1
        assert result.reason in ("allow", "insufficient_funds", "payer_suspended"), result
        if result.reason == "allow":
            receipt = json.loads(base64.b64decode(result.headers["x-payment-response"]))
            assert receipt["receipt_id"] not in self.books.receipts
            self.books.receipts[receipt["receipt_id"]] = (payer.public_key, atomic)
            self.books.spent_proofs.append((payer.public_key, path, headers))

    async def replay(self) -> None:
        if not self.books.spent_proofs:
            return
        _payer, path, headers = self.rng.choice(self.books.spent_proofs)
        for _ in range(DEFAULT_REDELIVERY_LIMIT + 1):  # a lost answer's retries, then past
            result = await check(self.servicer, check_request("GET", path, headers))
            self.books.outcomes[f"replay:{result.reason}"] += 1
            assert result.reason in ("allow", "nonce_reused", "payer_suspended"), result
            if result.reason == "allow":  # redelivered: its first receipt, charged nothing
                receipt = json.loads(base64.b64decode(result.headers["x-payment-response"]))
                assert receipt["receipt_id"] in self.books.receipts

    async def expired(self) -> None:
        payer = self.rng.choice(self.payers)
        headers = self.proof(payer, "/api/v1/market/signal", "0.0005", ttl=-5)
        result = await check(self.servicer, check_request("GET", "/api/v1/market/signal", headers))
        self.books.outcomes[f"expired:{result.reason}"] += 1
        assert result.reason == "invoice_expired"

    async def toggle(self) -> None:
        payer = self.rng.choice(self.payers)
        status = SUSPENDED if self.rng.random() < 0.25 else ACTIVE
        await self.ledger.set_status(payer.public_key, status)
        self.books.outcomes[f"status:{status}"] += 1

    async def held(self, retry: bool = False) -> None:
        """A route charged on success: the check places a hold; the response phase sees a
        random status and usage (or, for a killed worker, never runs)."""
        if retry and self.books.released:  # a proof whose hold was released: pays again
            payer_key, path, headers = self.books.released.pop(
                self.rng.randrange(len(self.books.released))
            )
        else:
            payer = self.rng.choice(self.payers)
            payer_key, path = payer.public_key, self.rng.choice(list(HELD_ROUTES))
            headers = self.proof(payer, path, HELD_ROUTES[path][0], ttl=120)
        extensions = HELD_ROUTES[path][1]
        response = await check_message(
            self.servicer, check_request("GET", path, headers, extensions)
        )
        result = outcome(response)
        kind = "held_retry" if retry else "held"
        self.books.outcomes[f"{kind}:{result.reason}"] += 1
        assert result.reason in ("allow", "insufficient_funds", "payer_suspended"), result
        if result.reason != "allow":
            return
        assert "x-payment-response" not in result.headers  # the receipt comes at the response
        roll = self.rng.random()
        if roll < 0.08:  # the worker was killed: the response phase never runs
            self.books.outcomes["held:abandoned"] += 1
            return
        status = self.rng.choice((200, 200, 200, 201, 404, 500, 503))
        usage = self.rng.choice(("0", "1", "37", "99", "100", "250", "", "bad", None))
        answer, kept = await self.respond(phase_call(response, status, usage), status)
        if contract.REPLACE_HEADER in answer:  # the hold expired before its response
            self.books.outcomes["held:expired_before_response"] += 1
            return
        receipts = {
            name.removeprefix(contract.SET_PREFIX): value
            for name, value in answer.items()
            if name.startswith(contract.SET_PREFIX)
        }
        receipt = json.loads(base64.b64decode(receipts["x-payment-response"]))
        if receipt["success"]:
            atomic = to_atomic(receipt["amount"], 6)
            assert atomic <= to_atomic(HELD_ROUTES[path][0], 6)
            assert receipt["receipt_id"] not in self.books.receipts
            self.books.receipts[receipt["receipt_id"]] = (payer_key, atomic)
            self.books.captured.append((payer_key, path, headers, receipt["receipt_id"], kept))
            self.books.outcomes[f"{kind}:captured"] += 1
        else:
            assert status >= 500 and receipt["amount"] == "0"
            self.books.released.append((payer_key, path, headers))
            self.books.outcomes[f"{kind}:released"] += 1

    async def respond(
        self, call: dict[str, str], status: int
    ) -> tuple[dict[str, str], bytes | None]:
        """The response phase as Envoy's Lua filter calls it (server/envoy/phase_call.py):
        half the time with the body, which the capture keeps for the payment's retries; the
        answer's headers."""
        body = b""
        if self.rng.random() < 0.5:
            body = json.dumps({"served": status, "n": self.rng.randrange(10**6)}).encode()
            call[contract.BODY_HEADER] = contract.WHOLE_BODY
        raw = await self.processor.answer(call, body, None)
        head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        assert head[0] == "HTTP/1.1 200 OK", head
        answer = dict(line.split(": ", 1) for line in head[1:])
        return answer, body if body and status < 500 else None

    async def replay_captured(self) -> None:
        """A captured hold's proof again: answered with its kept response, or redelivered,
        with the receipt that charged it (no new hold, nothing charged) up to the limit,
        then refused naming that receipt."""
        if not self.books.captured:
            return
        _payer, path, headers, receipt_id, kept = self.rng.choice(self.books.captured)
        extensions = HELD_ROUTES[path][1]
        for _ in range(DEFAULT_REDELIVERY_LIMIT + 1):
            request = check_request("GET", path, headers, extensions)
            message = await check_message(self.servicer, request)
            denied = message.denied_response
            replay = kept is not None and denied.body == kept.decode()  # the kept response
            if message.status.code != 0 and replay:
                self.books.outcomes["held_replay:replayed"] += 1
                replayed = {h.header.key: h.header.value for h in denied.headers}
                receipt = json.loads(base64.b64decode(replayed["x-payment-response"]))
                assert receipt["receipt_id"] == receipt_id
                continue
            result = outcome(message)
            self.books.outcomes[f"held_replay:{result.reason}"] += 1
            assert result.reason in ("allow", "nonce_reused", "payer_suspended"), result
            if result.reason == "nonce_reused":
                assert result.body["receipt_id"] == receipt_id
            if result.reason == "allow":
                receipt = json.loads(base64.b64decode(result.headers["x-payment-response"]))
                assert receipt["receipt_id"] == receipt_id

    async def held_retry(self) -> None:
        await self.held(retry=True)

    async def side_request(self, payer: Identity, **terms: Any) -> tuple[dict[str, Any], Any]:
        """A self-serve channel request signed by `payer`: (the signed object, the answer)."""
        signed = channel_requests.sign_request(
            {
                "payee": self.stack.gateway_identity.kid,
                "nonce": protocol.new_nonce(),
                "expires_at": int(time.time()) + 60,
                **terms,
            },
            payer,
        )
        return signed, await self.send(signed)

    async def send(self, signed: dict[str, Any]) -> Any:
        path = f"/x402/channel/{signed['action']}"
        headers = {channel_requests.HEADER: protocol.encode_header(signed)}
        status, _kind, body, *_ = await self.side.respond("POST", path, headers)
        answer = json.loads(body)
        return answer if status == 200 else answer["error"]

    async def channel(self) -> None:
        """A self-serve channel: the payer opens it (its request sometimes replayed), pays a
        few vouchers, and closes it itself or leaves it open for the end."""
        payer = self.rng.choice(self.payers)
        deposit = self.rng.randint(10_000, 2_000_000)
        open_terms = {"action": "open", "channel_id": vouchers.new_channel_id(), "asset": "USDF"}
        signed, opened = await self.side_request(
            payer, **open_terms, deposit=to_decimal(deposit, 6), ttl_seconds=600
        )
        reason = "opened" if isinstance(opened, dict) else opened
        self.books.outcomes[f"channel_open:{reason}"] += 1
        assert reason in ("opened", "insufficient_funds", "payer_suspended"), reason
        if reason != "opened":
            return
        if self.rng.random() < 0.3:  # the same open request again: nothing moves
            again = await self.send(signed)
            self.books.outcomes[f"channel_replay:{again}"] += 1
            assert again in ("nonce_reused", "payer_suspended"), again
        channel_id, cumulative, sequence = signed["channel_id"], 0, 0
        for _ in range(self.rng.randint(0, 4)):
            template = self.rng.choice(list(PRICES))
            atomic = PRICES[template][1]
            if cumulative + atomic > deposit:
                break
            path = template.format(n=self.rng.randint(1, 50))
            voucher = vouchers.sign_voucher(
                {
                    "channel_id": channel_id, "asset": "USDF",
                    "cumulative": to_decimal(cumulative + atomic, 6), "sequence": sequence + 1,
                    "resource": f"GET {path}", "payee": self.stack.gateway_identity.kid,
                },
                payer,
            )  # fmt: skip
            headers = {"x-payment": protocol.encode_header(voucher)}
            result = await check(self.servicer, check_request("GET", path, headers))
            self.books.outcomes[f"voucher:{result.reason}"] += 1
            assert result.reason in ("allow", "payer_suspended"), result
            if result.reason == "allow":
                cumulative, sequence = cumulative + atomic, sequence + 1
        if self.rng.random() < 0.2:
            self.books.open_channels.append((payer.public_key, channel_id))
            return
        _signed, closed = await self.side_request(payer, action="close", channel_id=channel_id)
        assert isinstance(closed, dict), closed  # a suspended payer still closes its own
        assert to_atomic(closed["spent"], 6) == cumulative
        self.books.receipts[closed["receipt"]["receipt_id"]] = (payer.public_key, cumulative)
        self.books.outcomes["channel_close"] += 1

    async def close_channels(self) -> None:
        """What the payers left open is closed at the end (as by its expiry)."""
        channels = Channels(self.ledger)
        for payer, channel_id in self.books.open_channels:
            closed = await channels.close(payer, channel_id)
            assert closed is not None and not closed.already
            self.books.receipts[closed.receipt_id] = (payer, closed.cumulative)

    async def run(self, operations: int) -> None:
        for payer in self.payers:
            await self.ledger.register(payer.public_key)
        kinds = (
            [self.credit] * 15
            + [self.pay] * 60
            + [self.replay] * 12
            + [self.expired] * 8
            + [self.toggle] * 5
            + [self.held] * 40
            + [self.held_retry] * 8
            + [self.replay_captured] * 6
            + [self.channel] * 10
        )
        done = 0
        while done < operations:
            size = min(BATCH, operations - done)
            await asyncio.gather(*(self.rng.choice(kinds)() for _ in range(size)))
            done += size
        for payer in self.payers:  # leave everyone active for the final checks
            await self.ledger.set_status(payer.public_key, ACTIVE)
        await self.close_channels()


def phase_call(
    check_response: authz.CheckResponse, status: int, usage: str | None
) -> dict[str, str]:
    """What Envoy's Lua filter sends at the response (server/envoy/phase_call.py): ext_authz's
    dynamic metadata (the hold) and the response's status and headers."""
    metadata = check_response.dynamic_metadata.fields
    call = {contract.META_PREFIX + key: value.string_value for key, value in metadata.items()}
    call[contract.STATUS_HEADER] = str(status)
    if usage is not None:
        call[contract.RESPONSE_PREFIX + "x402-usage"] = usage
    return call


async def run_and_check(stack: Stack, operations: int, seed: int) -> Books:
    """Run the workload against `stack`'s ledger (one Redis or a cluster), then check every
    invariant."""
    servicer, ledger = servicer_for(stack)
    workload = Workload(stack, servicer, ledger, random.Random(seed))
    try:
        await workload.run(operations)
        books = workload.books
        # Holds nobody captured (killed workers) are released by the ledger once expired.
        await asyncio.sleep(HOLD_SECONDS + 0.2)
        await Holds(ledger).sweep_all()
        by_payer: dict[str, list[str]] = defaultdict(list)
        for receipt_id, (payer, _amount) in books.receipts.items():
            by_payer[payer].append(receipt_id)
        totals = Counter[str]()
        for payer in (p.public_key for p in workload.payers):
            account = await ledger.account(payer)
            credited, balance = account.credited.get("USDF", 0), account.balances.get("USDF", 0)
            debited = account.debited.get("USDF", 0)
            assert credited == books.credited[payer]
            assert balance == credited - debited >= 0
            assert account.held == {}  # zero holds left
            assert account.channeled.get("USDF", 0) == 0  # every channel closed
            assert await raw(ledger).hlen(keyspace.holds(payer)) == 0
            assert await raw(ledger).zcard(keyspace.hold_expiries(payer)) == 0
            stream = await ledger.receipts(payer, count=10**6)
            ids = [entry["receipt_id"] for entry in stream]
            # every debit has exactly one receipt and every receipt one debit
            assert sorted(ids) == sorted(by_payer[payer])
            assert sum(int(entry["amount"]) for entry in stream) == debited
            assert sum(books.receipts[i][1] for i in ids) == debited
            # balances recorded after each debit: never below zero at any point
            assert all(int(entry["balance"]) >= 0 for entry in stream)
            credits = await xrange(raw(ledger), f"x402:{{{payer}}}:credits", count=10**6)
            assert sum(int(fields["amount"]) for _id, fields in credits) == credited
            totals.update(credited=credited, balance=balance, debited=debited)
        assert totals["credited"] == totals["balance"] + totals["debited"]
        # the workload really exercised every path
        outcomes = books.outcomes
        assert outcomes["allow"] > 0 and outcomes["insufficient_funds"] > 0
        assert outcomes["replay:nonce_reused"] > 0 and outcomes["credit_retry"] > 0
        assert outcomes["replay:allow"] > 0  # redelivered (docs/protocol.md §13)
        assert outcomes["expired:invoice_expired"] > 0 and outcomes["payer_suspended"] > 0
        assert outcomes["held:captured"] > 0 and outcomes["held:released"] > 0
        assert outcomes["held:abandoned"] > 0 and outcomes["held_retry:captured"] > 0
        assert outcomes["held_replay:nonce_reused"] > 0 and outcomes["held_replay:allow"] > 0
        assert outcomes["held_replay:replayed"] > 0  # a kept response (server/replays.py)
        assert outcomes["channel_open:opened"] > 0 and outcomes["channel_close"] > 0
        assert outcomes["channel_replay:nonce_reused"] > 0 and outcomes["voucher:allow"] > 0
        print(
            f"\nconservation: {operations} operations, seed {seed}: {dict(outcomes)}; "
            f"credited {totals['credited']} = balances {totals['balance']} + "
            f"captured {totals['debited']} atomic units; no hold left"
        )
        return books
    finally:
        await ledger.close()
