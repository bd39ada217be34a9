"""The gateway admin API: refused without its token, and every call with it, over real
gRPC to the real sidecar (and its CLI with --admin); mutual TLS in process."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from sidecar.core.identity import Identity
from sidecar.ledger.accounts import Ledger
from sidecar.server import admin
from sidecar.server import admin_pb2 as pb
from sidecar.server import admin_pb2_grpc as pb_grpc
from sidecar.server.config import Settings
from sidecar.tools.stack import Stack, free_port
from tests.support.cli import x402
from tests.support.payers import paid_requests
from tests.support.settlement import settle
from tests.support.stacks import ADMIN_TOKEN

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
METHODS = {
    "RegisterPayer": pb.PayerRequest,
    "SuspendPayer": pb.PayerRequest,
    "ActivatePayer": pb.PayerRequest,
    "Credit": pb.CreditRequest,
    "GetBalance": pb.PayerRequest,
    "ListReceipts": pb.ListReceiptsRequest,
    "OpenChannel": pb.OpenChannelRequest,
    "CloseChannel": pb.ChannelRequest,
    "GetChannel": pb.ChannelRequest,
    "ListBatches": pb.ListBatchesRequest,
}


@pytest.fixture
async def stub(admin_stack: Stack) -> AsyncIterator[Any]:
    address = f"127.0.0.1:{admin_stack.ports['admin_api']}"
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.GatewayAdminStub(channel)


def admin_args(stack: Stack, *, token: bool = True) -> list[str]:
    args = ["--admin", f"127.0.0.1:{stack.ports['admin_api']}"]
    if token:
        args += ["--admin-token-file", str(stack.dir / "admin.token")]
    return args


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-token-000000000"),)])
async def test_every_call_without_the_token_is_unauthenticated(
    stub: Any, metadata: tuple[tuple[str, str], ...], admin_stack: Stack
) -> None:
    payer = Identity.generate().public_key
    counted = _grpc_auth_failures(admin_stack)
    for method, request in METHODS.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(stub, method)(request(payer=payer), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    # Nothing happened: the payer was not registered by the refused calls.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetBalance(pb.PayerRequest(payer=payer), metadata=AUTH)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # Each refusal: one JSON line naming the method and why, never the token; and counted.
    reason = "wrong" if metadata else "missing"
    log = (admin_stack.dir / "sidecar.log").read_text()
    refused_lines = [
        json.loads(line)
        for line in log.splitlines()
        if '"admin.auth_refused"' in line and f'"reason": "{reason}"' in line
    ]
    methods = {line["method"].rsplit("/", 1)[1] for line in refused_lines}
    assert set(METHODS) <= methods and {line["api"] for line in refused_lines} == {"grpc"}
    assert "wrong-token-000000000" not in log
    assert _grpc_auth_failures(admin_stack) - counted == len(METHODS)


def _grpc_auth_failures(stack: Stack) -> float:
    """x402_admin_auth_failures_total{api="grpc"} from the sidecar's /metrics."""
    text = httpx.get(f"{stack.sideport_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('x402_admin_auth_failures_total{api="grpc"}')
    )


async def test_payers_credits_receipts_channels_and_batches(
    stub: Any,
    admin_stack: Stack,
) -> None:
    wallet = Identity.generate()
    payer = wallet.public_key

    registered = await stub.RegisterPayer(pb.PayerRequest(payer=payer), metadata=AUTH)
    assert (registered.created, registered.status) == (True, "active")
    again = await stub.RegisterPayer(pb.PayerRequest(payer=payer), metadata=AUTH)
    assert again.created is False
    credit = pb.CreditRequest(payer=payer, amount="2.5", idempotency_key="topup-1")
    assert (await stub.Credit(credit, metadata=AUTH)).balance == "2.5"
    retried = await stub.Credit(credit, metadata=AUTH)
    assert (retried.applied, retried.balance) == (False, "2.5")  # never twice

    async with httpx.AsyncClient(base_url=admin_stack.url, timeout=10) as client:
        receipts = await paid_requests(client, admin_stack, wallet, 3)
    listed = await stub.ListReceipts(pb.ListReceiptsRequest(payer=payer), metadata=AUTH)
    assert [r.receipt_id for r in listed.receipts] == [r["receipt_id"] for r in receipts]
    assert [json.loads(r.signed_json) for r in listed.receipts] == receipts
    page = await stub.ListReceipts(pb.ListReceiptsRequest(payer=payer, limit=2), metadata=AUTH)
    rest = await stub.ListReceipts(
        pb.ListReceiptsRequest(payer=payer, after=page.next_after), metadata=AUTH
    )
    assert len(page.receipts) == 2 and len(rest.receipts) == 1 and rest.next_after == ""

    opened = await stub.OpenChannel(
        pb.OpenChannelRequest(payer=payer, deposit="1", channel_id="ch_admin_test_01"),
        metadata=AUTH,
    )
    assert (opened.channel_id, opened.deposit, opened.balance, opened.status) == (
        "ch_admin_test_01",
        "1",
        "1.47",
        "open",
    )
    balance = await stub.GetBalance(pb.PayerRequest(payer=payer), metadata=AUTH)
    [usdf] = balance.assets
    assert (usdf.balance, usdf.channeled, usdf.debited, usdf.credited) == (
        "1.47",
        "1",
        "0.03",
        "2.5",
    )
    closed = await stub.CloseChannel(
        pb.ChannelRequest(payer=payer, channel_id="ch_admin_test_01"), metadata=AUTH
    )
    assert (closed.refund, closed.balance, closed.already_closed) == ("1", "2.47", False)

    assert (await settle(admin_stack)).code == 0
    batches = await stub.ListBatches(pb.ListBatchesRequest(payer=payer), metadata=AUTH)
    [batch] = batches.batches
    assert (batch.count, batch.committed, dict(batch.totals)) == (4, True, {"USDF": "30000"})
    assert json.loads(batch.manifest_json)["merkle_root"] == batch.merkle_root
    everyone = await stub.ListBatches(pb.ListBatchesRequest(), metadata=AUTH)
    assert batch.batch_id in {b.batch_id for b in everyone.batches}

    suspended = await stub.SuspendPayer(pb.PayerRequest(payer=payer), metadata=AUTH)
    assert suspended.status == "suspended"


@pytest.mark.parametrize(
    ("method", "request_fields", "code"),
    [
        ("GetBalance", {"payer": "not-a-key"}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "Credit",
            {"amount": "1.0000001", "idempotency_key": "k"},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("Credit", {"amount": "1"}, grpc.StatusCode.INVALID_ARGUMENT),  # no idempotency key
        ("GetBalance", {}, grpc.StatusCode.NOT_FOUND),
        ("OpenChannel", {"deposit": "5"}, grpc.StatusCode.NOT_FOUND),
        ("GetChannel", {"channel_id": "ch_missing_000"}, grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_calls_get_the_right_status(
    stub: Any, method: str, request_fields: dict[str, Any], code: grpc.StatusCode
) -> None:
    fields = {"payer": Identity.generate().public_key, **request_fields}
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await getattr(stub, method)(METHODS[method](**fields), metadata=AUTH)
    assert failed.value.code() == code


async def test_the_cli_payer_commands_use_the_admin_api(admin_stack: Stack) -> None:
    payer = Identity.generate().public_key
    run = await x402("payer", "register", payer, *admin_args(admin_stack))
    assert (run.code, run.out) == (0, "registered\n"), run.err
    run = await x402(
        "payer", "credit", payer, "3", "--idempotency-key", "k1", *admin_args(admin_stack)
    )
    assert run.out == "credited; balance 3 USDF (idempotency key k1)\n", run.err
    run = await x402(
        "channel", "open", payer, "1", "--id", "ch_cli_admin_01", *admin_args(admin_stack)
    )
    assert "channel ch_cli_admin_01" in run.out and "balance left 2 USDF" in run.out, run.err
    run = await x402("payer", "balance", payer, *admin_args(admin_stack))
    assert run.out == "status: active\nUSDF: 2 (+1 in channels)\n", run.err
    run = await x402("channel", "close", payer, "ch_cli_admin_01", *admin_args(admin_stack))
    assert "refunded 1; balance 3" in run.out, run.err
    assert (await x402("payer", "suspend", payer, *admin_args(admin_stack))).out == "suspended\n"
    assert (await x402("payer", "activate", payer, *admin_args(admin_stack))).out == "active\n"

    refused = await x402("payer", "balance", payer, *admin_args(admin_stack, token=False))
    assert refused.code == 1
    assert "admin API GetBalance: UNAUTHENTICATED" in refused.err


def test_the_admin_api_is_local_and_off_without_a_credential() -> None:
    settings = Settings()
    assert settings.listen_admin.startswith("127.0.0.1:")
    assert not settings.admin_token_file and not settings.admin_tls_client_ca_file


# -- mutual TLS, in process --------------------------------------------------------------


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""

    def run(command: str) -> None:
        subprocess.run(
            ["openssl", *command.split()], check=True, capture_output=True, cwd=directory
        )

    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    run(f"req -x509 {ec} -keyout ca.key -out ca.pem -days 1 -subj /CN=x402-test-CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        run(f"req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name}")
        (directory / f"{name}.ext").write_text((extension or "basicConstraints=CA:FALSE") + "\n")
        run(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
            f"-out {name}.pem -days 1 -extfile {name}.ext"
        )
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    return {name: directory / name for name in names}


async def test_mutual_tls_without_a_token(stack: Stack, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    port = free_port()
    settings = Settings.from_mapping(
        {
            "listen_admin": f"127.0.0.1:{port}",
            "admin_tls_cert_file": str(pki["server.pem"]),
            "admin_tls_key_file": str(pki["server.key"]),
            "admin_tls_client_ca_file": str(pki["ca.pem"]),
            "redis_url": stack.redis_url,
        },
        env={},
    )
    ledger = Ledger.from_url(stack.redis_url)
    gateway = Settings.load(stack.config_path).gateway()
    server = await admin.start_admin(settings, ledger, gateway)
    assert server is not None
    payer = Identity.generate().public_key
    try:
        trusted = grpc.ssl_channel_credentials(
            pki["ca.pem"].read_bytes(),
            pki["client.key"].read_bytes(),
            pki["client.pem"].read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", trusted) as channel:
            reply = await pb_grpc.GatewayAdminStub(channel).RegisterPayer(
                pb.PayerRequest(payer=payer)
            )
            assert reply.created
        anonymous = grpc.ssl_channel_credentials(pki["ca.pem"].read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", anonymous) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GatewayAdminStub(channel).GetBalance(
                    pb.PayerRequest(payer=payer), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        # The CLI speaks mutual TLS too.
        run = await x402(
            "payer", "balance", payer, "--admin", f"127.0.0.1:{port}",
            "--admin-ca", str(pki["ca.pem"]), "--admin-cert", str(pki["client.pem"]),
            "--admin-key", str(pki["client.key"]),
        )  # fmt: skip
        assert run.out == "status: active\nUSDF: 0\n", run.err
    finally:
        await server.stop(None)
        await ledger.close()
