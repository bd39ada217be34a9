"""Self-serve channels: an agent opens a channel from its own prepaid balance, and closes
it, with a request signed by its Ed25519 key (core/channel_requests.py), on the side port
beside the top-up (`POST /x402/channel/open`, `POST /x402/channel/close`, the request in
the `X-Channel-Request` header; docs/protocol.md §9).

Every check that needs no ledger runs first; then one Lua script moves the money and
spends the request's nonce together (ledger/channels.py): a refusal moves nothing, a
replayed request opens or closes nothing. The answer carries a signed receipt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from sidecar.core import channel_requests, protocol, receipts
from sidecar.core.channel_requests import CLOSE, OPEN, ChannelRequest
from sidecar.core.decision import Gateway
from sidecar.core.errors import (
    AmountError,
    BadRequest,
    InternalError,
    MalformedPayment,
    PaymentError,
)
from sidecar.core.money import Asset
from sidecar.core.receipts import Receipt
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels, Nonce
from sidecar.server.channel_config import ChannelTerms
from sidecar.server.envoy.contract import CHANNEL_CLOSE_PATH, CHANNEL_OPEN_PATH
from sidecar.server.logs import get_logger

Answer = tuple[int, str, bytes, dict[str, str]]
ACTIONS = {CHANNEL_OPEN_PATH: OPEN, CHANNEL_CLOSE_PATH: CLOSE}
log = get_logger("sidecar.self_channels")


class SelfChannels:
    def __init__(
        self, gateway: Gateway, ledger: Ledger, terms: ChannelTerms, assets: Mapping[str, Asset]
    ) -> None:
        self.gateway, self.terms, self.assets = gateway, terms, assets
        self.channels = Channels(ledger)

    async def respond(self, method: str, path: str, headers: Mapping[str, str]) -> Answer:
        """One request, one answer and one `channel.decision` log line."""
        started = time.perf_counter()
        line: dict[str, Any] = {"action": ACTIONS.get(path), "payer": None, "channel_id": None}
        try:
            request = self._request(method, path, headers)
            line.update(payer=request.payer, channel_id=request.channel_id)
            now = int(time.time())
            channel_requests.verify_request(request, self.gateway, now)
            if request.action == OPEN:
                body = await self._open(request, now)
            else:
                body = await self._close(request)
            line.update(decision="allow", status=200, reason=request.action)
            line.update(receipt_id=body["receipt"]["receipt_id"], balance=body["balance"])
            encoded = protocol.encode_header(body["receipt"])
            extra = {name: encoded for name in protocol.RECEIPT_HEADERS}
            return 200, "application/json", json.dumps(body).encode(), extra
        except PaymentError as error:
            line.update(decision="deny", status=error.status, reason=error.reason)
            return _deny(error)
        except Exception:  # a bug never moves money silently, and always answers
            log.exception("channel.error", payer=line["payer"])
            failure = InternalError("the channel request failed; try again")
            line.update(decision="deny", status=failure.status, reason=failure.reason)
            return _deny(failure)
        finally:
            line["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            log.info("channel.decision", **line)

    def _request(self, method: str, path: str, headers: Mapping[str, str]) -> ChannelRequest:
        if method != "POST":
            raise BadRequest("a channel request is a POST")
        header = headers.get(channel_requests.HEADER)
        if not header:
            raise BadRequest(f"send the signed request in the {channel_requests.HEADER} header")
        if len(header) > self.gateway.max_proof_bytes:
            raise MalformedPayment(f"request header is larger than {self.gateway.max_proof_bytes}")
        request = channel_requests.request_from(protocol.decode_header(header))
        if request.action != ACTIONS[path]:
            raise BadRequest(f"{path} takes action {ACTIONS[path]!r}, not {request.action!r}")
        return request

    async def _open(self, request: ChannelRequest, now: int) -> dict[str, Any]:
        asset, terms = self.terms.asset, self.terms
        if request.asset != asset.code:
            raise BadRequest(f"self-serve channels hold {asset.code}", asset=asset.code)
        try:
            deposit = asset.to_atomic(request.deposit)
        except AmountError as exc:
            raise BadRequest(f"deposit: {exc}") from None
        if not terms.min_deposit <= deposit <= terms.max_deposit:
            low, high = asset.to_decimal(terms.min_deposit), asset.to_decimal(terms.max_deposit)
            raise BadRequest(f"a deposit is {low} to {high} {asset.code}", min=low, max=high)
        if request.ttl_seconds > terms.max_ttl_seconds:
            raise BadRequest(
                f"a channel lives at most {terms.max_ttl_seconds} seconds",
                max_ttl_seconds=terms.max_ttl_seconds,
            )
        channel_id, balance = await self.channels.open(
            request.payer,
            asset.code,
            deposit,
            request.payee,
            ttl=request.ttl_seconds,
            channel_id=request.channel_id,
            nonce=_nonce(request),
            now=now,
        )
        expires_at = now + request.ttl_seconds
        body = receipts.channel_open_body(
            request.payer,
            channel_id,
            asset,
            deposit,
            balance,
            expires_at,
            protocol.new_receipt_id(),
            request.payee,
            now,
        )
        receipt = Receipt.sign(body, self.gateway.signer(request.payee))
        return {
            "channel_id": channel_id,
            "payer": request.payer,
            "payee": request.payee,
            "asset": asset.code,
            "deposit": asset.to_decimal(deposit),
            "balance": asset.to_decimal(balance),
            "expires_at": expires_at,
            "receipt": receipt.to_wire(),
        }

    async def _close(self, request: ChannelRequest) -> dict[str, Any]:
        payer, channel_id = request.payer, request.channel_id
        closed = await self.channels.close(payer, channel_id, nonce=_nonce(request))
        assert closed is not None  # only an only-expired close answers None
        entry = await self.channels.close_entry(payer, channel_id)
        asset = self.assets[entry["asset"]]
        receipt = Receipt.sign(
            receipts.body(payer, entry, asset), self.gateway.signer(entry["payee"])
        )
        return {
            "channel_id": channel_id,
            "payer": payer,
            "asset": asset.code,
            "deposit": asset.to_decimal(int(entry["deposit"])),
            "spent": asset.to_decimal(closed.cumulative),
            "refund": asset.to_decimal(closed.refund),
            "balance": asset.to_decimal(closed.balance),
            "already_closed": closed.already,
            "receipt": receipt.to_wire(),
        }


def _nonce(request: ChannelRequest) -> Nonce:
    """Spent until the request can no longer pass: its last valid second included."""
    return Nonce(request.nonce, request.expires_at + 1)


def _deny(error: PaymentError) -> Answer:
    body: dict[str, Any] = {"error": error.reason, "message": error.message, **error.details}
    extra = {"retry-after": "1"} if error.status == 503 else {}
    return error.status, "application/json", json.dumps(body).encode(), extra
