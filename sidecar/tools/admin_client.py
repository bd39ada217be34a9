"""The admin API's client (`x402 payer … --admin ADDR`): the ledger's `Payers` service,
spoken over gRPC. Each method answers the same shape as `sidecar.ledger.payers.Payers`, so
the CLI prints one way whichever path it took.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc

from sidecar.core.errors import X402Error
from sidecar.core.identity import read_secret
from sidecar.ledger.channels import DEFAULT_TTL
from sidecar.ledger.payers import (
    AssetBalance,
    Balance,
    ChannelClosing,
    ChannelView,
    Credited,
    Registered,
)
from sidecar.server import admin_pb2 as pb
from sidecar.server import admin_pb2_grpc as pb_grpc
from sidecar.server.admin import MIN_TOKEN_BYTES

TIMEOUT = 10.0  # seconds per call


@dataclass(frozen=True)
class AdminTarget:
    address: str
    token_file: str | None = None
    ca_file: str | None = None  # the server's CA: TLS
    cert_file: str | None = None  # a client certificate: mutual TLS
    key_file: str | None = None


def _read(path: str | None) -> bytes | None:
    try:
        return Path(path).read_bytes() if path else None
    except OSError as exc:
        raise X402Error(f"cannot read {path}: {exc.strerror}") from None


class AdminPayers:
    """`Payers` over the admin API; every failure is one X402Error line naming the call."""

    def __init__(self, target: AdminTarget) -> None:
        self.metadata: tuple[tuple[str, str], ...] = ()
        if target.token_file:
            token = read_secret(target.token_file, "--admin-token-file", MIN_TOKEN_BYTES)
            self.metadata = (("authorization", f"Bearer {token.decode()}"),)
        if target.ca_file:
            credentials = grpc.ssl_channel_credentials(
                _read(target.ca_file), _read(target.key_file), _read(target.cert_file)
            )
            self.channel = grpc.aio.secure_channel(target.address, credentials)
        else:
            self.channel = grpc.aio.insecure_channel(target.address)
        self.stub = pb_grpc.GatewayAdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(
                request, metadata=self.metadata, timeout=TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise X402Error(f"admin API {method}: {exc.code().name}: {exc.details()}") from None

    async def register(self, payer: str) -> Registered:
        reply = await self._call("RegisterPayer", pb.PayerRequest(payer=payer))
        return Registered(reply.created, reply.status)

    async def suspend(self, payer: str) -> str:
        return str((await self._call("SuspendPayer", pb.PayerRequest(payer=payer))).status)

    async def activate(self, payer: str) -> str:
        return str((await self._call("ActivatePayer", pb.PayerRequest(payer=payer))).status)

    async def credit(
        self, payer: str, amount: str, asset_code: str | None, idempotency_key: str
    ) -> Credited:
        request = pb.CreditRequest(
            payer=payer, asset=asset_code or "", amount=amount, idempotency_key=idempotency_key
        )
        reply = await self._call("Credit", request)
        return Credited(reply.applied, reply.asset, reply.balance)

    async def balance(self, payer: str) -> Balance:
        reply = await self._call("GetBalance", pb.PayerRequest(payer=payer))
        assets = tuple(
            AssetBalance(e.asset, e.balance, e.channeled, e.credited, e.debited)
            for e in reply.assets
        )
        return Balance(reply.payer, reply.status, assets)

    async def open_channel(
        self,
        payer: str,
        deposit: str,
        asset_code: str | None,
        ttl: int = DEFAULT_TTL,
        channel_id: str | None = None,
    ) -> ChannelView:
        request = pb.OpenChannelRequest(
            payer=payer,
            asset=asset_code or "",
            deposit=deposit,
            ttl_seconds=ttl,
            channel_id=channel_id or "",
        )
        reply = await self._call("OpenChannel", request)
        # pb.Channel carries ChannelView's fields under the same names.
        return ChannelView(*(getattr(reply, field.name) for field in fields(ChannelView)))

    async def close_channel(self, payer: str, channel_id: str) -> ChannelClosing:
        request = pb.ChannelRequest(payer=payer, channel_id=channel_id)
        r = await self._call("CloseChannel", request)
        # The reply names no asset: the amounts are already decimals of the channel's asset.
        return ChannelClosing(
            r.channel_id,
            "",
            r.cumulative,
            r.refund,
            r.balance,
            r.vouchers,
            r.receipt_id,
            r.already_closed,
        )
