"""Reconciliation from the chain (`x402 reconcile`, and worker 0 on an interval): every
transfer of a configured token to `pay_to` made by an EIP-3009 authorization is matched,
by its authorizer and nonce, to what the ledger recorded of it. A top-up the ledger lost
(its reservation, which names the payer it credits, survived; its credit did not) is
credited now, once, by the top-up's own script and idempotency key; an `exact` payment is
known; a transfer the gateway never saw is reported unmatched and credited to no one.

Every log of the range is read before anything is credited: a range the RPC cannot serve
credits nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.core import exact
from sidecar.core.errors import X402Error
from sidecar.core.exact import OnchainAsset
from sidecar.ledger.authorizations import Authorizations
from sidecar.server import metrics
from sidecar.server.facilitation import ChainRangeError, ChainReader
from sidecar.server.logs import get_logger

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
CREDITED, KNOWN, UNMATCHED = "credited", "known", "unmatched"
log = get_logger("sidecar.reconcile")


@dataclass(frozen=True, slots=True)
class Transfer:
    """One transfer to `pay_to` and what reconciliation made of it."""

    asset: str
    transaction: str
    sender: str
    value: int  # atomic units of the token (= of the ledger asset)
    outcome: str  # credited, known or unmatched
    nonce: str = ""  # the authorization's, if one moved it
    payer: str = ""  # the Ed25519 key a top-up credits
    kind: str = ""  # "topup" or "exact" (matched), "" (unmatched)


@dataclass
class Report:
    first: int
    last: int
    transfers: list[Transfer] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for t in self.transfers if t.outcome == outcome)

    def summary(self) -> dict[str, int]:
        return {
            "from_block": self.first,
            "to_block": self.last,
            **{outcome: self.count(outcome) for outcome in (CREDITED, KNOWN, UNMATCHED)},
        }


def _address(topic: str) -> str:
    return "0x" + topic[-40:].lower()


class Reconciler:
    def __init__(
        self,
        chain: ChainReader,
        authorizations: Authorizations,
        assets: Mapping[str, OnchainAsset],
        pay_to: str,
    ) -> None:
        self.chain, self.authorizations = chain, authorizations
        self.assets, self.pay_to = assets, pay_to.lower()

    async def run(self, first: int | None = None, blocks: int = 2000) -> Report:
        """Blocks `first`..head (default: the last `blocks`)."""
        head = await self.chain.head()
        start = max(0, head - blocks + 1) if first is None else first
        if start > head:
            raise ChainRangeError(
                f"the RPC cannot serve blocks {start}..{head}: {start} is past the chain's "
                f"head {head}"
            )
        report = Report(start, head)
        found = [
            (onchain, *await self._read(onchain.token, start, head)) for onchain in self._tokens()
        ]
        for onchain, transfers, used in found:  # everything read: now the ledger
            for log in transfers:
                report.transfers.append(await self._match(onchain, log, used))
        return report

    def _tokens(self) -> list[OnchainAsset]:
        return list(self.assets.values())

    async def _read(
        self, token: str, first: int, last: int
    ) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[str]]]:
        to = "0x" + self.pay_to.removeprefix("0x").rjust(64, "0")
        transfers = await self.chain.logs(token, [TRANSFER_TOPIC, None, to], first, last)
        authorizations = await self.chain.logs(token, [exact.AUTHORIZATION_USED_TOPIC], first, last)
        used: dict[tuple[str, str], list[str]] = {}  # (tx, authorizer) → nonces
        for log in authorizations:
            topics = log.get("topics") or []
            if len(topics) == 3:
                where = (str(log.get("transactionHash", "")).lower(), _address(topics[1]))
                used.setdefault(where, []).append(str(topics[2]).lower())
        return transfers, used

    async def _match(
        self, onchain: OnchainAsset, log: dict[str, Any], used: dict[tuple[str, str], list[str]]
    ) -> Transfer:
        transaction = str(log.get("transactionHash", "")).lower()
        sender = _address(str((log.get("topics") or ["", ""])[1]))
        value = int(str(log.get("data", "0x0")), 16)
        facts: dict[str, Any] = {
            "asset": onchain.asset, "transaction": transaction, "sender": sender, "value": value,
        }  # fmt: skip
        for nonce in used.get((transaction, sender), []):
            key = f"{onchain.network}:{onchain.token.lower()}:{nonce}"
            state = await self.authorizations.state(sender, key)
            if not state:
                continue
            owner = state.rsplit(":", 1)[-1] if state.count(":") >= 2 else ""
            if not owner:
                return Transfer(**facts, outcome=KNOWN, nonce=nonce, kind="exact")
            outcome = await self._credit(onchain, owner, f"{key}:{sender}", value, transaction)
            return Transfer(**facts, outcome=outcome, nonce=nonce, payer=owner, kind="topup")
        return Transfer(**facts, outcome=UNMATCHED)

    async def _credit(
        self, onchain: OnchainAsset, payer: str, source: str, value: int, transaction: str
    ) -> str:
        """The top-up's credit, through its own script (once per authorization)."""
        if await self.authorizations.credited(payer, source):
            return KNOWN
        credit = await self.authorizations.credit_topup(
            payer, onchain.asset, value, source, transaction
        )
        return CREDITED if credit.applied else KNOWN


async def reconcile_forever(
    reconciler: Reconciler, chain: ChainReader, interval: float, blocks: int
) -> None:
    """Worker 0: a pass over the last `blocks` blocks now, then every `interval` seconds;
    one line per pass, the repairs counted (x402_reconcile_repairs)."""
    try:
        while True:
            try:
                report = await reconciler.run(None, blocks)
            except (X402Error, OSError) as exc:  # the chain or Redis down: next time
                log.warning("reconcile.failed", error=str(exc))
            else:
                metrics.reconcile_repaired(report.count(CREDITED))
                log.info("reconcile.pass", **report.summary())
                for transfer in report.transfers:
                    if transfer.outcome == CREDITED:
                        log.warning("reconcile.credited", **dataclasses.asdict(transfer))
            await asyncio.sleep(interval)
    finally:
        await chain.close()
