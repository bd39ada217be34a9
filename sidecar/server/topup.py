"""Self-serve top-ups: `POST /x402/topup?payer=<Ed25519 key>&amount=<decimal>` buys prepaid
credit for an Ed25519 key with the x402 `exact` scheme, payable by an unmodified official
x402 client (docs/protocol.md, "Top-up").

Served by the side port; Envoy routes the path there without ext_authz, like discovery.
Without `PAYMENT-SIGNATURE` the answer is a 402 whose `accepts` is `exact` for that
amount; with it: the authorization is matched against that offer, reserved, verified and
settled (the `exact` scheme's ExactSettler), and only then credited, once per authorization.
The key needs no registration: its account is made by its first credit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from sidecar.core import decision, exact, protocol, receipts
from sidecar.core.decision import Gateway, payer_key
from sidecar.core.errors import (
    AmountError,
    BadRequest,
    CreditNotDurable,
    InternalError,
    LedgerNotDurable,
    MalformedPayment,
    NonceReused,
    PayerSuspended,
    PaymentError,
    PaymentRequired,
    SettlementFailed,
)
from sidecar.core.money import Asset
from sidecar.core.protocol import Offer
from sidecar.ledger.accounts import ACTIVE
from sidecar.ledger.authorizations import Authorizations
from sidecar.server.envoy.contract import FORWARDED_HOST, FORWARDED_PROTO, TOPUP_PATH
from sidecar.server.logs import get_logger
from sidecar.server.settler import ExactSettler

Answer = tuple[int, str, bytes, dict[str, str]]
log = get_logger("sidecar.topup")


class TopupService:
    def __init__(
        self, gateway: Gateway, settler: ExactSettler, authorizations: Authorizations, asset: Asset
    ) -> None:
        assert gateway.exact is not None
        self.gateway, self.terms = gateway, gateway.exact
        self.settler, self.authorizations, self.asset = settler, authorizations, asset
        self.onchain = self.terms.assets[asset.code]
        self.low, self.high = self.terms.topup["min_atomic"], self.terms.topup["max_atomic"]

    async def respond(self, method: str, query: str, headers: Mapping[str, str]) -> Answer:
        started = time.perf_counter()
        line: dict[str, Any] = {"payer": None, "amount": None, "authorizer": None}
        offer: Offer | None = None
        try:
            if method != "POST":
                raise BadRequest("a top-up is a POST")
            payer, amount = self._terms(query)
            line.update(payer=payer, amount=self.asset.to_decimal(amount))
            offer = exact.offer(self.onchain, amount, self.terms)
            context = (payer, amount, offer, query, headers)
            answer = await self._pay(line, *context)
            line.update(decision="allow", status=200, reason="topup")
            return answer
        except PaymentError as error:
            line.update(decision="deny", status=error.status, reason=error.reason)
            line.update(error.logged)
            return self._deny(error, line, offer, query, headers)
        except Exception:  # a bug never credits, and never leaves the agent without an answer
            log.exception("topup.error", payer=line["payer"])
            failure = InternalError("the top-up failed; nothing was credited; try again")
            line.update(decision="deny", status=failure.status, reason=failure.reason)
            return self._deny(failure, line, offer, query, headers)
        finally:
            line["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            log.info("topup.decision", **line)

    def _terms(self, query: str) -> tuple[str, int]:
        try:
            fields = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=8)
        except ValueError:
            raise BadRequest("the query has too many fields") from None
        values = {name: fields.get(name, []) for name in ("payer", "amount")}
        for name, found in values.items():
            if len(found) != 1 or not found[0]:
                raise BadRequest(f"name exactly one {name}: ?payer=<Ed25519 key>&amount=<decimal>")
        payer, amount_text = values["payer"][0], values["amount"][0]
        try:
            payer_key(payer)
        except ValueError:
            raise BadRequest("payer is not a base64url Ed25519 public key") from None
        try:
            amount = self.asset.to_atomic(amount_text)
        except AmountError as exc:
            raise BadRequest(f"amount: {exc}") from None
        if not self.low <= amount <= self.high:
            raise BadRequest(
                f"a top-up is {self.asset.to_decimal(self.low)} to "
                f"{self.asset.to_decimal(self.high)} {self.asset.code}",
                min=self.asset.to_decimal(self.low),
                max=self.asset.to_decimal(self.high),
            )
        return payer, amount

    async def _pay(
        self,
        line: dict[str, Any],
        payer: str,
        amount: int,
        offer: Offer,
        query: str,
        headers: Mapping[str, str],
    ) -> Answer:
        # A suspended payer is refused before anything is verified or settled.
        if (await self.authorizations.status(payer)) not in (None, ACTIVE):
            raise PayerSuspended("this payer is suspended")
        mode = await self.authorizations.durable.takes_money()
        if not mode.takes_money:  # refused before anything is verified or settled
            raise LedgerNotDurable(f"top-ups are refused: {mode.detail}")
        header = headers.get("payment-signature") or headers.get("x-payment")
        if header is None:
            raise PaymentRequired(
                f"{self.asset.to_decimal(amount)} {self.asset.code} of credit for this key "
                f"costs {amount} atomic units of {self.onchain.token} on {self.onchain.network}"
            )
        if len(header) > self.gateway.max_proof_bytes:
            raise MalformedPayment(f"payment header is larger than {self.gateway.max_proof_bytes}")
        decoded = protocol.decode_header(header)
        if not isinstance(decoded, dict):
            raise MalformedPayment("payment must be a JSON object")
        auth = exact.verify(decoded, offer, int(time.time()))
        line["authorizer"] = auth.payer
        try:
            settled = await self.settler.settle(auth, owner=payer)
        except NonceReused as reused:  # an earlier attempt's settle or credit was lost
            settled = await self.settler.recover(auth, reused, owner=payer)
        source = f"{auth.key}:{auth.payer}"
        credit = await self.authorizations.credit_topup(
            payer, self.asset.code, amount, source, settled["transaction"]
        )
        if not credit.durable:  # credited (now or before), not confirmed on disk: no 200
            line.update(transaction=settled["transaction"], durable=False)
            raise CreditNotDurable(
                "the payment settled on chain and was credited, but the ledger did not "
                "confirm the credit on disk; send the same PAYMENT-SIGNATURE again (it is "
                "credited at most once)",
                transaction=settled["transaction"],
            )
        if not credit.applied:  # a retry of an authorization that credited this key:
            line["replayed"] = True  # its answer again, the same receipt id; no credit
        receipt = protocol.sign_receipt(
            receipts.topup_body(
                payer,
                auth.sender,
                self.asset,
                amount,
                credit.balance,
                settled,
                receipts.topup_receipt_id(source),
                self.gateway.payee,
                int(time.time()),
            ),
            self.gateway.identity,
        )
        line.update(
            transaction=settled["transaction"],
            receipt_id=receipt["receipt_id"],
            settled_via=settled.get("via", "ledger"),  # "chain": a lost settle answer looked up
            balance=self.asset.to_decimal(credit.balance),
        )
        body = {
            "payer": payer,
            "asset": self.asset.code,
            "credited": self.asset.to_decimal(amount),
            "balance": self.asset.to_decimal(credit.balance),
            "transaction": settled["transaction"],
            "receipt": receipt,
        }
        settlement = exact.settle_response(auth, settled["transaction"])
        extra = dict(protocol.receipt_headers(protocol.encode_header(receipt), settlement))
        return 200, "application/json", json.dumps(body).encode(), extra

    def _deny(
        self,
        error: PaymentError,
        line: dict[str, Any],
        offer: Offer | None,
        query: str,
        headers: Mapping[str, str],
    ) -> Answer:
        body: dict[str, Any] = {"error": error.reason, "message": error.message}
        body.update({k: v for k, v in error.details.items() if k != "state"})
        extra: dict[str, str] = {}
        if error.status == 402 and offer is not None:
            amount = int(offer.amount)
            body["x402"] = {
                "version": protocol.VERSION,
                "kind": "topup",
                "scheme": exact.SCHEME,
                "payer": line["payer"],
                "asset": self.asset.code,
                "amount": self.asset.to_decimal(amount),
                "amount_atomic": str(amount),
                **exact.invoice_fields(self.onchain, amount, self.terms),
            }
            required = {
                "x402Version": exact.X402_VERSION,
                "error": error.reason,
                "resource": {
                    "url": f"{self._base_url(headers)}{TOPUP_PATH}?{query}",
                    "description": f"prepaid {self.asset.code} credit for an Ed25519 key",
                    "mimeType": "application/json",
                },
                "accepts": [offer.to_wire()],
            }
            extra["payment-required"] = protocol.encode_header(required)
        if isinstance(error, SettlementFailed) and error.settlement is not None:
            extra[protocol.PAYMENT_RESPONSE] = protocol.encode_header(error.settlement)
        if error.status == 503:
            extra["retry-after"] = "1"
        return error.status, "application/json", json.dumps(body).encode(), extra

    def _base_url(self, headers: Mapping[str, str]) -> str:
        """As the check's (core/decision.py Request.base_url): Envoy's X-Forwarded-Proto
        (a trusted proxy's, else the connection's), the trusted proxy's X-Forwarded-Host."""
        if self.gateway.public_url:
            return self.gateway.public_url
        scheme = "https" if headers.get(FORWARDED_PROTO) == "https" else "http"
        host = decision.request_host(
            headers.get("host", "localhost"),
            headers.get(FORWARDED_HOST),
            self.gateway.trusted_proxies,
        )
        return f"{scheme}://{host}"
