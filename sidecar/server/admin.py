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
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc

from sidecar.core.decision import Gateway
from sidecar.core.errors import (
    AmountError,
    ConfigError,
    InsufficientFunds,
    LedgerUnavailable,
    PayerSuspended,
    UnknownPayer,
    X402Error,
)
from sidecar.core.identity import verify_key
from sidecar.core.money import Asset
from sidecar.core.protocol import canonical_json
from sidecar.ledger import keyspace, settlement
from sidecar.ledger.accounts import ACTIVE, SUSPENDED, Ledger
from sidecar.ledger.channels import DEFAULT_TTL, Channels
from sidecar.server import admin_pb2 as pb
from sidecar.server import admin_pb2_grpc as pb_grpc
from sidecar.server import wiring
from sidecar.server.config import Settings
from sidecar.server.logs import get_logger

T = TypeVar("T")
MIN_TOKEN_BYTES = 16
MAX_RECEIPTS = 1000
log = get_logger("sidecar.server.admin")


# -- authentication ---------------------------------------------------------------------


def read_secret(path: str, key: str) -> bytes:
    """A token file's content (stripped); the error names the key, never the content."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"config {key}: cannot read {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"config {key}: the token must be at least {MIN_TOKEN_BYTES} bytes")
    return token


async def _unauthenticated(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class BearerToken(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every call must carry `authorization: Bearer <token>`; compared in constant time."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token
        self._refuse = grpc.unary_unary_rpc_method_handler(_unauthenticated)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                if hmac.compare_digest(given, self._expected):
                    return await continuation(details)
        return self._refuse  # every RPC of the service is unary-unary


# -- the service ------------------------------------------------------------------------


class Facilitator(pb_grpc.FacilitatorServicer):  # type: ignore[misc]
    def __init__(self, ledger: Ledger, gateway: Gateway, settings: Settings) -> None:
        self.ledger = ledger
        self.gateway = gateway
        self.assets = settings.asset_table()
        self.default_asset = settings.default_asset
        self.channels = Channels(ledger)

    # helpers
    def _asset(self, code: str) -> Asset:
        asset = self.assets.get(code or self.default_asset)
        if asset is None:
            raise X402Error(f"unknown asset {code!r} (known: {', '.join(self.assets)})")
        return asset

    @staticmethod
    def _payer(payer: str) -> str:
        try:
            verify_key(payer)
        except (ValueError, UnicodeEncodeError):
            raise X402Error("payer: expected base64url of a 32-byte Ed25519 public key") from None
        return payer

    def _show(self, code: str, atomic: int) -> str:
        asset = self.assets.get(code)
        return asset.to_decimal(atomic) if asset else str(atomic)

    # payers
    async def RegisterPayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterPayerResponse:
        async def op() -> pb.RegisterPayerResponse:
            created = await self.ledger.register(self._payer(request.payer))
            account = await self.ledger.account(request.payer)
            return pb.RegisterPayerResponse(created=created, status=account.status)

        return await _answer(context, op)

    async def SuspendPayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PayerStatus:
        return await self._status(request, context, SUSPENDED)

    async def ActivatePayer(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.PayerStatus:
        return await self._status(request, context, ACTIVE)

    async def _status(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext, status: str
    ) -> pb.PayerStatus:
        async def op() -> pb.PayerStatus:
            await self.ledger.set_status(self._payer(request.payer), status)
            return pb.PayerStatus(payer=request.payer, status=status)

        return await _answer(context, op)

    async def Credit(
        self, request: pb.CreditRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreditResponse:
        async def op() -> pb.CreditResponse:
            if not request.idempotency_key:
                raise X402Error("idempotency_key is required (a retry must not credit twice)")
            asset = self._asset(request.asset)
            amount = asset.to_atomic(request.amount)
            result = await self.ledger.credit(
                self._payer(request.payer), asset.code, amount, request.idempotency_key
            )
            return pb.CreditResponse(
                applied=result.applied, asset=asset.code, balance=asset.to_decimal(result.balance)
            )

        return await _answer(context, op)

    async def GetBalance(
        self, request: pb.PayerRequest, context: grpc.aio.ServicerContext
    ) -> pb.Balance:
        async def op() -> pb.Balance:
            payer = self._payer(request.payer)
            account = await self.ledger.account(payer)
            fields = cast(dict[str, str], await self.ledger.redis.hgetall(keyspace.account(payer)))
            channeled = {
                k.removeprefix("channeled:"): int(v)
                for k, v in fields.items()
                if k.startswith("channeled:")
            }
            codes = sorted(set(account.balances) | set(account.credited) | set(channeled))
            return pb.Balance(
                payer=payer,
                status=account.status,
                assets=[
                    pb.AssetBalance(
                        asset=code,
                        balance=self._show(code, account.balances.get(code, 0)),
                        channeled=self._show(code, channeled.get(code, 0)),
                        credited=self._show(code, account.credited.get(code, 0)),
                        debited=self._show(code, account.debited.get(code, 0)),
                    )
                    for code in codes
                ],
            )

        return await _answer(context, op)

    async def ListReceipts(
        self, request: pb.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReceiptsResponse:
        async def op() -> pb.ListReceiptsResponse:
            payer = self._payer(request.payer)
            limit = min(request.limit or 100, MAX_RECEIPTS)
            start = f"({request.after}" if request.after else "-"
            entries = cast(
                list[tuple[str, dict[str, str]]],
                await self.ledger.redis.xrange(keyspace.receipts(payer), min=start, count=limit),
            )
            receipts = []
            for stream_id, fields in entries:
                signed = settlement.signed_receipt(
                    payer, fields, self.assets, self.gateway.identity
                )
                receipts.append(
                    pb.Receipt(
                        stream_id=stream_id,
                        receipt_id=fields.get("receipt_id", ""),
                        kind=fields.get("kind", "debit"),
                        asset=signed["asset"],
                        amount=signed["amount"],
                        issued_at=int(fields.get("issued_at", "0")),
                        resource=fields.get("resource", ""),
                        route=fields.get("route", ""),
                        channel_id=fields.get("channel_id", ""),
                        signed_json=canonical_json(signed).decode(),
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
            payer = self._payer(request.payer)
            asset = self._asset(request.asset)
            deposit = asset.to_atomic(request.deposit)
            channel_id, balance = await self.channels.open(
                payer,
                asset.code,
                deposit,
                self.gateway.payee,
                ttl=request.ttl_seconds or DEFAULT_TTL,
                channel_id=request.channel_id or None,
            )
            state = await self.channels.get(payer, channel_id)
            return self._channel(state, balance=asset.to_decimal(balance))

        return await _answer(context, op)

    async def GetChannel(
        self, request: pb.ChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.Channel:
        async def op() -> pb.Channel:
            state = await self.channels.get(self._payer(request.payer), request.channel_id)
            return self._channel(state)

        return await _answer(context, op)

    def _channel(self, state: Any, balance: str = "") -> pb.Channel:
        return pb.Channel(
            channel_id=state.channel_id,
            payer=state.payer,
            payee=state.payee,
            asset=state.asset,
            deposit=self._show(state.asset, state.deposit),
            cumulative=self._show(state.asset, state.cumulative),
            sequence=state.sequence,
            status=state.status,
            opened_at=state.opened_at,
            expires_at=state.expires_at,
            balance=balance,
        )

    async def CloseChannel(
        self, request: pb.ChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        async def op() -> pb.CloseChannelResponse:
            payer = self._payer(request.payer)
            state = await self.channels.get(payer, request.channel_id)
            closed = await self.channels.close(payer, request.channel_id)
            assert closed is not None  # only_expired=False always closes

            def show(atomic: int) -> str:
                return self._show(state.asset, atomic)

            return pb.CloseChannelResponse(
                channel_id=closed.channel_id,
                refund=show(closed.refund),
                cumulative=show(closed.cumulative),
                sequence=closed.sequence,
                balance=show(closed.balance),
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
            payer = self._payer(request.payer) if request.payer else None
            found = await settlement.recent_batches(
                self.ledger, limit=min(request.limit or 100, MAX_RECEIPTS), payer=payer
            )
            committed_seq: dict[str, int] = {}
            batches = []
            for manifest in found:
                owner = manifest["payer"]
                if owner not in committed_seq:
                    seq = await self.ledger.redis.hget(keyspace.settlement(owner), "seq")
                    committed_seq[owner] = int(seq or 0)
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


async def _answer(context: grpc.aio.ServicerContext, op: Callable[[], Awaitable[T]]) -> T:
    """Typed errors → gRPC status codes; the message is safe to show (no secrets)."""
    try:
        return await op()
    except LedgerUnavailable as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    except UnknownPayer as exc:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    except (PayerSuspended, InsufficientFunds) as exc:
        details = f"{exc} ({exc.reason})"
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, details)
    except AmountError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except X402Error as exc:
        message = str(exc)
        code = grpc.StatusCode.INVALID_ARGUMENT
        if message.startswith("no channel"):
            code = grpc.StatusCode.NOT_FOUND
        elif "exists already" in message:
            code = grpc.StatusCode.FAILED_PRECONDITION
        await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


# -- serving ----------------------------------------------------------------------------


async def start_admin(
    settings: Settings, ledger: Ledger, gateway: Gateway
) -> grpc.aio.Server | None:
    """The admin gRPC server, started; None when no credential is configured."""
    if not settings.listen_admin:
        return None
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
        interceptors.append(BearerToken(read_secret(settings.admin_token_file, "admin_token_file")))
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_FacilitatorServicer_to_server(Facilitator(ledger, gateway, settings), server)
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
    """What worker 0 runs beside ext_authz: the admin API and the settlement worker."""

    admin: grpc.aio.Server | None
    settler: asyncio.Task[None] | None
    stop: asyncio.Event

    async def close(self, grace: float) -> None:
        self.stop.set()
        if self.admin is not None:
            await self.admin.stop(grace)
        if self.settler is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.settler, grace)


async def start_facilities(settings: Settings, ledger: Ledger, gateway: Gateway) -> Facilities:
    admin = await start_admin(settings, ledger, gateway)
    stop, settler = asyncio.Event(), None
    if settings.settle_interval_seconds:
        worker = wiring.settler(settings, ledger, gateway.identity)
        settler = asyncio.create_task(
            worker.run_forever(settings.settle_interval_seconds, stop), name="x402-settle"
        )
    return Facilities(admin, settler, stop)


# -- the client (x402 payer … --admin ADDR) --------------------------------------------


@dataclass(frozen=True)
class AdminTarget:
    address: str
    token_file: str | None = None
    ca_file: str | None = None  # the server's CA: TLS
    cert_file: str | None = None  # a client certificate: mutual TLS
    key_file: str | None = None


class AdminClient:
    """A blocking client for the CLI; every error is one X402Error line."""

    def __init__(self, target: AdminTarget) -> None:
        self.metadata: tuple[tuple[str, str], ...] = ()
        if target.token_file:
            token = read_secret(target.token_file, "--admin-token-file").decode()
            self.metadata = (("authorization", f"Bearer {token}"),)
        if target.ca_file:

            def read(path: str | None) -> bytes | None:
                try:
                    return Path(path).read_bytes() if path else None
                except OSError as exc:
                    raise X402Error(f"cannot read {path}: {exc.strerror}") from None

            credentials = grpc.ssl_channel_credentials(
                read(target.ca_file), read(target.key_file), read(target.cert_file)
            )
            self.channel = grpc.secure_channel(target.address, credentials)
        else:
            self.channel = grpc.insecure_channel(target.address)
        self.stub = pb_grpc.FacilitatorStub(self.channel)

    def call(self, method: str, request: Any, timeout: float = 10.0) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            name = code.name if code is not None else "UNKNOWN"
            raise X402Error(f"admin API {method}: {name}: {exc.details()}") from None

    def close(self) -> None:
        self.channel.close()


class RemotePayers:
    """The CLI's payer and channel commands over the admin API (`--admin ADDR`); each
    returns the lines the local command prints."""

    def __init__(self, target: AdminTarget) -> None:
        self.client = AdminClient(target)

    def __enter__(self) -> RemotePayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def register(self, payer: str) -> str:
        reply = self.client.call("RegisterPayer", pb.PayerRequest(payer=payer))
        return "registered" if reply.created else "already registered"

    def set_status(self, payer: str, suspend: bool) -> str:
        method = "SuspendPayer" if suspend else "ActivatePayer"
        return str(self.client.call(method, pb.PayerRequest(payer=payer)).status)

    def credit(self, payer: str, amount: str, asset: str | None, key: str) -> str:
        reply = self.client.call(
            "Credit",
            pb.CreditRequest(payer=payer, asset=asset or "", amount=amount, idempotency_key=key),
        )
        verb = "credited" if reply.applied else "already applied (idempotency key seen)"
        return f"{verb}; balance {reply.balance} {reply.asset} (idempotency key {key})"

    def balance(self, payer: str) -> str:
        reply = self.client.call("GetBalance", pb.PayerRequest(payer=payer))
        lines = [f"status: {reply.status}"]
        for entry in reply.assets:
            locked = f" (+{entry.channeled} in channels)" if entry.channeled != "0" else ""
            lines.append(f"{entry.asset}: {entry.balance}{locked}")
        return "\n".join(lines)

    def open_channel(
        self, payer: str, deposit: str, asset: str | None, ttl: int, channel_id: str | None
    ) -> str:
        reply = self.client.call(
            "OpenChannel",
            pb.OpenChannelRequest(
                payer=payer,
                asset=asset or "",
                deposit=deposit,
                ttl_seconds=ttl,
                channel_id=channel_id or "",
            ),
        )
        return channel_opened(
            reply.channel_id, reply.deposit, reply.asset, reply.expires_at, reply.balance
        )

    def close_channel(self, payer: str, channel_id: str) -> str:
        reply = self.client.call(
            "CloseChannel", pb.ChannelRequest(payer=payer, channel_id=channel_id)
        )
        return channel_closed(
            reply.channel_id,
            reply.cumulative,
            reply.refund,
            reply.balance,
            reply.vouchers,
            reply.receipt_id,
            reply.already_closed,
        )


def channel_opened(channel_id: str, deposit: str, asset: str, expires_at: int, balance: str) -> str:
    return (
        f"channel {channel_id}\n"
        f"deposit {deposit} {asset}, open until {expires_at} (unix time)\n"
        f"balance left {balance} {asset}"
    )


def channel_closed(
    channel_id: str,
    cumulative: str,
    refund: str,
    balance: str,
    vouchers: int,
    receipt_id: str,
    already: bool,
) -> str:
    head = f"channel {channel_id} {'was already closed' if already else 'closed'}"
    return (
        f"{head}: spent {cumulative} in {vouchers} vouchers, refunded {refund}; "
        f"balance {balance}\nsettlement receipt {receipt_id}"
    )
