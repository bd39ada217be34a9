"""What each dashboard page shows, read from the ledger's services (reports, settlement,
decisions, evidence, Payers) and from the Prometheus registry (metrics.decision_counts),
never from rendered text. Nothing here draws HTML (views.py) or answers HTTP (routes.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sidecar.core.batches import signed_receipt
from sidecar.core.decision import Gateway
from sidecar.core.errors import SettlementError, X402Error
from sidecar.ledger import decisions, evidence, reports, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.payers import Balance, ChannelView, Payers, checked_key
from sidecar.server import metrics

RECENT_DECISIONS = 500  # read from the stream per page; filtered here
SHOWN_DECISIONS = 200
FILTERS = ("route", "payer", "reason")


@dataclass(frozen=True)
class Summary:
    """The overview and /api/summary: revenue from the ledger's receipts, decisions by
    (decision, reason) from the metrics of every worker."""

    payers: list[str]
    revenue: reports.Revenue
    by_reason: dict[tuple[str, str], int]
    open_holds: int
    credits: list[reports.CreditRecord]
    lag: float | None


@dataclass(frozen=True)
class Decisions:
    chosen: list[dict[str, Any]]  # the filtered ones, at most SHOWN_DECISIONS
    wanted: dict[str, str]  # the filters: route, payer, reason ("" for any)
    reasons: list[str]  # every reason seen, and the one asked for


@dataclass(frozen=True)
class ShownReceipt:
    receipt: reports.ReceiptRecord
    verifies: bool  # re-signed as the agent received it, it verifies with our keys
    settled: bool


@dataclass(frozen=True)
class PayerDetail:
    payer: str
    balance: Balance
    receipts: list[ShownReceipt]
    channels: list[ChannelView]


@dataclass(frozen=True)
class BatchStatus:
    manifest: dict[str, Any]
    committed: bool  # else still anchoring


@dataclass(frozen=True)
class Unsettled:
    payer: str
    receipts: list[reports.ReceiptRecord]  # after the payer's settled cursor
    sums: dict[str, int]  # atomic, by asset


@dataclass(frozen=True)
class SettlementState:
    batches: list[BatchStatus]
    unsettled: list[Unsettled]
    lag: float | None


class DashboardData:
    """The dashboard's reads, one method per page."""

    def __init__(self, ledger: Ledger, gateway: Gateway, payers: Payers) -> None:
        self.ledger, self.gateway, self.payers = ledger, gateway, payers

    def show(self, asset: str, atomic: int) -> str:
        return self.payers.show(asset, atomic)

    async def summary(self) -> Summary:
        among = await reports.payers(self.ledger)
        revenue = await reports.revenue(self.ledger, among)
        by_reason: dict[tuple[str, str], int] = defaultdict(int)
        for (decision, reason, _route), count in metrics.decision_counts().items():
            by_reason[(decision, reason)] += count
        try:
            async with asyncio.timeout(1):
                lag = await settlement.settlement_lag(self.ledger)
        except (X402Error, OSError, TimeoutError):
            lag = None
        return Summary(
            payers=among,
            revenue=revenue,
            by_reason=dict(by_reason),
            open_holds=await reports.open_holds(self.ledger, among),
            credits=await reports.credits(self.ledger, among, per_payer=10),
            lag=lag,
        )

    async def decisions(self, query: dict[str, str]) -> Decisions:
        wanted = {k: query.get(k, "") for k in FILTERS}
        found = await decisions.recent(self.ledger, RECENT_DECISIONS)
        chosen = [
            d for d in found if all(not v or str(d.get(k) or "") == v for k, v in wanted.items())
        ][:SHOWN_DECISIONS]
        reasons = sorted({str(d.get("reason") or "") for d in found} | {wanted["reason"]})
        return Decisions(chosen, wanted, reasons)

    async def payer_balances(self, limit: int = 500) -> list[Balance]:
        found = []
        for payer in (await reports.payers(self.ledger))[:limit]:
            try:
                found.append(await self.payers.balance(payer))
            except X402Error:
                continue
        return found

    async def payer(self, payer: str, balance: Balance) -> PayerDetail:
        """One payer's page, its balance read already (Payers.balance: X402Error when the
        payer is unknown or the key is bad)."""
        receipts = await reports.recent_receipts(self.ledger, payer, 50)
        cursor = await reports.settled_cursor(self.ledger, payer)
        keys = self.gateway.keys.public_keys()
        shown = []
        for r in receipts:
            try:
                signed = signed_receipt(payer, r.fields, self.payers.assets, self.gateway.keys)
                ok = signed.verify(keys)
            except SettlementError:
                ok = False
            shown.append(ShownReceipt(r, ok, not reports.stream_after(r.stream_id, cursor)))
        channels = []
        for channel_id in await reports.channel_ids(self.ledger, payer):
            try:
                channels.append(await self.payers.channel(payer, channel_id))
            except X402Error:
                continue
        return PayerDetail(payer, balance, shown, channels)

    async def settlement(self) -> SettlementState:
        committed: dict[str, int] = {}
        batches = []
        for m in await settlement.recent_batches(self.ledger, limit=100):
            owner = str(m["payer"])
            if owner not in committed:
                committed[owner] = await settlement.committed_seq(self.ledger, owner)
            batches.append(BatchStatus(m, int(m["seq"]) <= committed[owner]))
        unsettled = []
        for payer in await reports.payers(self.ledger):
            cursor = await reports.settled_cursor(self.ledger, payer)
            pending = [
                r for r in await reports.receipts(self.ledger, payer)
                if reports.stream_after(r.stream_id, cursor)
            ]  # fmt: skip
            if pending:
                sums: dict[str, int] = defaultdict(int)
                for r in pending:
                    sums[r.asset] += r.amount
                unsettled.append(Unsettled(payer, pending, dict(sums)))
        lag = await settlement.settlement_lag(self.ledger)
        return SettlementState(batches, unsettled, lag)

    async def evidence(self, payer: str) -> dict[str, Any]:
        """The evidence bundle of the payer's settled receipts; X402Error for a bad key."""
        result = await evidence.export(
            self.ledger,
            self.gateway.keys,
            self.payers.assets,
            evidence.Query(payer=checked_key(payer)),
        )
        return result.bundle
