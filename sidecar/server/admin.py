"""The facilitator admin API (protos/admin.proto): payers, balances, receipts, channels,
settlement batches, over gRPC on its own port.

Served by worker 0 of `x402 serve` when `admin_token_file` or mutual TLS is configured;
bound to 127.0.0.1 by default. Without a credential it does not start: an admin port
without authentication would let anyone on the network mint balances.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web

from sidecar.core.batches import signed_receipt
from sidecar.core.decision import Gateway
from sidecar.core.errors import (
    ChannelExists,
    ConfigError,
    InsufficientFunds,
    LedgerUnavailable,
    PayerSuspended,
    PaymentError,
    UnknownChannel,
    UnknownPayer,
    X402Error,
)
from sidecar.core.identity import read_secret
from sidecar.core.protocol import canonical_json
from sidecar.ledger import settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import DEFAULT_TTL
from sidecar.ledger.payers import checked_key
from sidecar.server import admin_pb2 as pb
from sidecar.server import admin_pb2_grpc as pb_grpc
from sidecar.server import metrics, wiring
from sidecar.server.config import Settings
from sidecar.server.dashboard.routes import start_dashboard
from sidecar.server.logs import get_logger

T = TypeVar("T")
MIN_TOKEN_BYTES = 16
MAX_RECEIPTS = 1000
log = get_logger("sidecar.server.admin")


# -- authentication ---------------------------------------------------------------------


def _refusal(method: str, reason: str) -> grpc.RpcMethodHandler:
    """Refuse one call, after one JSON line (never the token) and a count of it."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        log.warning("admin.auth_refused", api="grpc", method=method, reason=reason, peer=peer)
        metrics.admin_auth_failed("grpc")
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    return grpc.unary_unary_rpc_method_handler(refuse)  # every RPC is unary-unary


class BearerToken(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call must carry `authorization: Bearer <token>`; compared in constant time.
    A refusal is logged (`admin.auth_refused`) and counted (x402_admin_auth_failures)."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        reason = "missing"
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                if hmac.compare_digest(given, self._expected):
                    return await continuation(details)
                reason = "wrong"
        return _refusal(str(details.method), reason)


# -- the service ------------------------------------------------------------------------


class GatewayAdmin(pb_grpc.GatewayAdminServicer):  # type: ignore[misc]
    """The admin API over the ledger's `Payers` service: each RPC converts its answer."""

    def __init__(self, ledger: Ledger, gateway: Gateway, settings: Settings) -> None:
        self.ledger = ledger
        self.gateway = gateway
        self.payers = wiring.payers(settings, ledger, gateway.payee)

    # payers
    async def RegisterPayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPayerResponse:
        async def op() -> pb.RegisterPayerResponse:
            registered = await self.payers.register(request.payer)
            return pb.RegisterPayerResponse(created=registered.created, status=registered.status)

        return await _answer(context, op)

    async def SuspendPayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PayerStatus:
        return await self._status(request.payer, self.payers.suspend, context)

    async def ActivatePayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PayerStatus:
        return await self._status(request.payer, self.payers.activate, context)

    async def _status(
        self,
        payer: str,
        change: Callable[[str], Awaitable[str]],
        context: grpc.aio.ServicerContext,
    ) -> pb.PayerStatus:
        async def op() -> pb.PayerStatus:
            return pb.PayerStatus(payer=payer, status=await change(payer))

        return await _answer(context, op)

    async def Credit(
        self, request: pb.CreditRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreditResponse:
        async def op() -> pb.CreditResponse:
            credited = await self.payers.credit(
                request.payer, request.amount, request.asset, request.idempotency_key
            )
            return pb.CreditResponse(
                applied=credited.applied, asset=credited.asset, balance=credited.balance
            )

        return await _answer(context, op)

    async def GetBalance(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Balance:
        async def op() -> pb.Balance:
            balance = await self.payers.balance(request.payer)
            return pb.Balance(
                payer=balance.payer,
                status=balance.status,
                assets=[pb.AssetBalance(**asdict(entry)) for entry in balance.assets],
            )

        return await _answer(context, op)

    async def ListReceipts(
        self, request: pb.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReceiptsResponse:
        async def op() -> pb.ListReceiptsResponse:
            payer = checked_key(request.payer)
            limit = min(request.limit or 100, MAX_RECEIPTS)
            entries = await self.ledger.receipt_page(payer, request.after, limit)
            receipts = []
            for stream_id, fields in entries:
                signed = signed_receipt(payer, fields, self.payers.assets, self.gateway.keys)
                receipts.append(
                    pb.Receipt(
                        stream_id=stream_id,
                        receipt_id=fields.get("receipt_id", ""),
                        kind=fields.get("kind", "debit"),
                        asset=signed.asset,
                        amount=signed.amount,
                        issued_at=int(fields.get("issued_at", "0")),
                        resource=fields.get("resource", ""),
                        route=fields.get("route", ""),
                        channel_id=fields.get("channel_id", ""),
                        signed_json=canonical_json(signed.to_wire()).decode(),
                    )
                )
            more = len(entries) == limit
            return pb.ListReceiptsResponse(
                receipts=receipts, next_after=entries[-1][0] if more and entries else ""
            )

        return await _answer(context, op)

    # channels
    async def OpenChannel(
        self, request: pb.OpenChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.Channel:
        async def op() -> pb.Channel:
            opened = await self.payers.open_channel(
                request.payer,
                request.deposit,
                request.asset,
                request.ttl_seconds or DEFAULT_TTL,
                request.channel_id or None,
            )
            return pb.Channel(**asdict(opened))

        return await _answer(context, op)

    async def GetChannel(
        self, request: pb.ChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.Channel:
        async def op() -> pb.Channel:
            return pb.Channel(
                **asdict(await self.payers.channel(request.payer, request.channel_id))
            )

        return await _answer(context, op)

    async def CloseChannel(
        self, request: pb.ChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        async def op() -> pb.CloseChannelResponse:
            closed = await self.payers.close_channel(request.payer, request.channel_id)
            return pb.CloseChannelResponse(
                channel_id=closed.channel_id,
                refund=closed.refund,
                cumulative=closed.cumulative,
                balance=closed.balance,
                receipt_id=closed.receipt_id,
                already_closed=closed.already,
                vouchers=closed.vouchers,
            )

        return await _answer(context, op)

    # settlement
    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBatchesResponse:
        async def op() -> pb.ListBatchesResponse:
            payer = checked_key(request.payer) if request.payer else None
            found = await settlement.recent_batches(
                self.ledger, limit=min(request.limit or 100, MAX_RECEIPTS), payer=payer
            )
            committed_seq: dict[str, int] = {}
            batches = []
            for manifest in found:
                owner = manifest["payer"]
                if owner not in committed_seq:
                    committed_seq[owner] = await settlement.committed_seq(self.ledger, owner)
                batches.append(
                    pb.Batch(
                        batch_id=manifest["batch_id"],
                        payer=owner,
                        seq=manifest["seq"],
                        count=manifest["count"],
                        merkle_root=manifest["merkle_root"],
                        closed_at=manifest["closed_at"],
                        totals=manifest["totals"],
                        committed=manifest["seq"] <= committed_seq[owner],
                        manifest_json=json.dumps(manifest, sort_keys=True),
                    )
                )
            return pb.ListBatchesResponse(batches=batches)

        return await _answer(context, op)


# Typed errors → gRPC status codes, the most specific type first; anything else of ours is
# the caller's bad argument.
GRPC_CODES: tuple[tuple[type[X402Error], grpc.StatusCode], ...] = (
    (LedgerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (UnknownPayer, grpc.StatusCode.NOT_FOUND),
    (UnknownChannel, grpc.StatusCode.NOT_FOUND),
    (PayerSuspended, grpc.StatusCode.FAILED_PRECONDITION),
    (InsufficientFunds, grpc.StatusCode.FAILED_PRECONDITION),
    (ChannelExists, grpc.StatusCode.FAILED_PRECONDITION),
    (X402Error, grpc.StatusCode.INVALID_ARGUMENT),
)


def grpc_code(error: X402Error) -> grpc.StatusCode:
    return next(code for kind, code in GRPC_CODES if isinstance(error, kind))


async def _answer(context: grpc.aio.ServicerContext, op: Callable[[], Awaitable[T]]) -> T:
    """Typed errors → gRPC status codes; the message is safe to show (no secrets)."""
    try:
        return await op()
    except X402Error as exc:
        reason = getattr(exc, "reason", None)
        details = f"{exc} ({reason})" if isinstance(exc, PaymentError) else str(exc)
        await context.abort(grpc_code(exc), details)
    raise AssertionError("unreachable: context.abort raises")


# -- serving ----------------------------------------------------------------------------


def check_listener(settings: Settings) -> None:
    """An admin API off loopback must be served with TLS: its bearer token and the
    credits it grants would otherwise cross the network in the clear."""
    enabled = settings.admin_token_file or settings.admin_tls_client_ca_file
    if not settings.listen_admin or not enabled or settings.admin_tls_cert_file:
        return
    host = settings.listen_admin.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"config listen_admin: {settings.listen_admin} is not a loopback address; an "
            "admin API on the network needs TLS (admin_tls_cert_file, admin_tls_key_file)"
        )


async def start_admin(
    settings: Settings, ledger: Ledger, gateway: Gateway
) -> grpc.aio.Server | None:
    """The admin gRPC server, started; None when no credential is configured."""
    if not settings.listen_admin:
        return None
    check_listener(settings)
    tls = settings.admin_tls_cert_file or settings.admin_tls_key_file
    if not settings.admin_token_file and not settings.admin_tls_client_ca_file:
        log.warning(
            "admin.disabled",
            reason="no admin_token_file and no admin_tls_client_ca_file: not serving "
            "an unauthenticated admin API",
        )
        return None
    interceptors = []
    if settings.admin_token_file:
        interceptors.append(
            BearerToken(
                read_secret(settings.admin_token_file, "config admin_token_file", MIN_TOKEN_BYTES)
            )
        )
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_GatewayAdminServicer_to_server(GatewayAdmin(ledger, gateway, settings), server)
    if tls or settings.admin_tls_client_ca_file:
        credentials = _server_credentials(settings)
        port = server.add_secure_port(settings.listen_admin, credentials)
    else:
        port = server.add_insecure_port(settings.listen_admin)
    if port == 0:
        raise ConfigError(f"config listen_admin: cannot listen on {settings.listen_admin}")
    await server.start()
    log.info(
        "admin.started",
        listen_admin=settings.listen_admin,
        token=bool(settings.admin_token_file),
        mtls=bool(settings.admin_tls_client_ca_file),
    )
    return server


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    def read(key: str) -> bytes:
        path = getattr(settings, key)
        if not path:
            raise ConfigError(f"config {key}: required for TLS on the admin port")
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"config {key}: cannot read {path}: {exc.strerror}") from None

    client_ca = read("admin_tls_client_ca_file") if settings.admin_tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read("admin_tls_key_file"), read("admin_tls_cert_file"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class Facilities:
    """What worker 0 runs beside ext_authz: the admin API, the settlement worker and the
    dashboard."""

    admin: grpc.aio.Server | None
    settler: asyncio.Task[None] | None
    stop: asyncio.Event
    dashboard: web.AppRunner | None = None

    async def close(self, grace: float) -> None:
        self.stop.set()
        if self.dashboard is not None:
            await self.dashboard.cleanup()
        if self.admin is not None:
            await self.admin.stop(grace)
        if self.settler is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.settler, grace)


async def start_facilities(settings: Settings, ledger: Ledger, gateway: Gateway) -> Facilities:
    admin = await start_admin(settings, ledger, gateway)
    stop, settler = asyncio.Event(), None
    if settings.settle_interval_seconds:
        worker = wiring.settler(settings, ledger, gateway.keys)
        settler = asyncio.create_task(
            worker.run_forever(settings.settle_interval_seconds, stop), name="x402-settle"
        )
    dashboard = await start_dashboard(settings, ledger, gateway)
    return Facilities(admin, settler, stop, dashboard)
