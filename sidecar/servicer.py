"""The Envoy ext_authz v3 servicer: CheckRequest → pricing, decision, ledger → CheckResponse."""

from __future__ import annotations

import time
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from sidecar import channel, decision, metrics, protocol
from sidecar.channel import Channels
from sidecar.decision import Allow, Denial, Gateway, Request
from sidecar.errors import ConfigError, InternalError, PaymentError, PaymentRequired
from sidecar.ledger import Ledger
from sidecar.logs import get_logger
from sidecar.pricing import Price, RouteTable

_OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
_OK = status_pb2.Status(code=code_pb2.OK)
_DENIED = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)
# A free route still strips proof headers: they are bearer material, never for the upstream.
_FREE = authz.CheckResponse(
    status=_OK, ok_response=authz.OkHttpResponse(headers_to_remove=protocol.PROOF_HEADERS)
)

log = get_logger("sidecar.authz")


def _headers(pairs: tuple[tuple[str, str], ...]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=_OVERWRITE)
        for k, v in pairs
    ]


def denied_response(denial: Denial) -> authz.CheckResponse:
    return authz.CheckResponse(
        status=_DENIED,
        denied_response=authz.DeniedHttpResponse(
            status=HttpStatus(code=denial.status),
            headers=_headers(denial.headers),
            body=denial.body.decode(),
        ),
    )


def ok_response(allowed: Allow, price: Price) -> authz.CheckResponse:
    metadata = Struct()
    metadata.update(
        {
            "payer": allowed.receipt["payer"],
            "amount": price.display,
            "asset": price.asset.code,
            "receipt_id": allowed.receipt["receipt_id"],
        }
    )
    return authz.CheckResponse(
        status=_OK,
        ok_response=authz.OkHttpResponse(
            headers=_headers(allowed.upstream_headers),
            headers_to_remove=protocol.PROOF_HEADERS,
            response_headers_to_add=_headers(allowed.response_headers),
        ),
        dynamic_metadata=metadata,
    )


class Authorization(authz_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self, routes: RouteTable, gateway: Gateway, ledger: Ledger, worker: int = 0
    ) -> None:
        self.routes = routes
        self.gateway = gateway
        self.ledger = ledger
        self.worker = worker
        self.channels = Channels(ledger)

    async def Check(
        self, check: authz.CheckRequest, context: grpc.aio.ServicerContext
    ) -> authz.CheckResponse:
        started = time.perf_counter()
        http = check.attributes.request.http
        headers = http.headers
        request = Request(
            method=http.method,
            path=http.path.partition("?")[0],
            host=http.host,
            scheme=http.scheme or "http",
            proof_header=headers.get("x-payment") or headers.get("payment-signature"),
        )
        entry: dict[str, Any] = {
            "request_id": headers.get("x-request-id"),
            "method": request.method,
            "path": request.path,
            "route": None,
            "price": None,
            "asset": None,
            "payer": None,
            "invoice_id": None,
            "receipt_id": None,
            "balance": None,
            "worker": self.worker,
        }
        response, price = await self._decide(request, check, entry)
        elapsed = time.perf_counter() - started
        entry["latency_ms"] = round(elapsed * 1000, 3)
        metrics.record(entry, price, elapsed)
        if price is not None:
            entry.update(route=price.route, price=price.display, asset=price.asset.code)
        log.info("authz.decision", **entry)
        return response

    async def _decide(
        self, request: Request, check: authz.CheckRequest, entry: dict[str, Any]
    ) -> tuple[authz.CheckResponse, Price | None]:
        gateway, price = self.gateway, None
        now = int(time.time())
        try:
            price = self.routes.price_for(
                request.method, request.path, check.attributes.context_extensions
            )
            if price is None:
                entry.update(decision="allow", status=200, reason="free")
                return _FREE, None
            if request.proof_header is None:
                raise PaymentRequired(
                    f"{request.resource} costs {price.display} {price.asset.code}"
                )
            payment = protocol.decode_payment(request.proof_header, gateway.max_proof_bytes)
            if payment.get("scheme") == channel.SCHEME:  # a state-channel voucher
                voucher = channel.voucher_from(payment)
                allowed = await self.channels.pay(voucher, request, price, gateway, now, entry)
                return ok_response(allowed, price), price
            proof = protocol.proof_from(payment)
            decision.verify_payment(request, price, gateway, now, proof)
            entry["payer"], entry["invoice_id"] = proof.payer, proof.invoice_id
            receipt_id = protocol.new_receipt_id()
            balance = await self.ledger.debit(
                proof.payer,
                proof.nonce,
                price.asset.code,
                price.amount,
                proof.expires_at,
                receipt_id,
                {
                    "nonce": proof.nonce,
                    "invoice_id": proof.invoice_id or "",
                    "resource": proof.resource,
                    "asset": price.asset.code,
                    "amount": price.amount,
                    "route": price.route,
                    "issued_at": now,
                    "payee": gateway.payee,
                },
            )
            allowed = decision.allow(proof, price, balance, receipt_id, gateway, now)
            entry.update(
                decision="allow",
                status=200,
                reason="paid",
                receipt_id=receipt_id,
                balance=allowed.receipt["balance"],
            )
            return ok_response(allowed, price), price
        except PaymentError as error:
            return self._deny(error, request, price, entry, now), price
        except ConfigError as error:  # a bad price annotation in Envoy's config: fail closed
            return self._deny(InternalError(str(error)), request, price, entry, now), price
        except Exception:  # a bug must never let a request through
            log.exception("authz.error", method=request.method, path=request.path)
            failure = InternalError("the payment check failed; try again")
            return self._deny(failure, request, price, entry, now), price

    def _deny(
        self,
        error: PaymentError,
        request: Request,
        price: Price | None,
        entry: dict[str, Any],
        now: int,
    ) -> authz.CheckResponse:
        denial = decision.deny(error, request, price, self.gateway, now)
        entry.update(
            decision="deny", status=denial.status, reason=denial.reason, balance=denial.balance
        )
        entry["invoice_id"] = entry["invoice_id"] or denial.invoice_id
        return denied_response(denial)
