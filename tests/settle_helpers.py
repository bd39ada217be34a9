"""Helpers of the settlement, evidence and channel tests: pay through a real stack, run the
real `x402` CLI, and check that every receipt is in exactly one batch."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.core import batches, merkle
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic
from sidecar.ledger import keyspace, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack, free_port
from tests.conftest import ENVOY_ROUTES, ROUTES, funded_payer, pay_direct

VERIFY = "/api/v1/trade/verify/T-{n}"  # 0.01 USDF, the route ROUTES["verify"]
VERIFY_PRICE = 10_000


@dataclass
class Run:
    code: int
    out: str
    err: str


ROOT = Path(__file__).resolve().parents[1]


async def x402(*args: str, env: dict[str, str] | None = None, limit: float = 60) -> Run:
    """Run the real CLI in its own process, as an operator would."""
    return await python_module("sidecar.tools.cli", *args, env=env, limit=limit)


async def python_module(
    module: str, *args: str, env: dict[str, str] | None = None, limit: float = 60
) -> Run:
    """`python -m MODULE ARGS…` in its own process, from the repository's root."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), limit)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


async def paid_requests(
    client: httpx.AsyncClient, stack: Stack, wallet: Identity, count: int
) -> list[dict[str, Any]]:
    """`count` direct payments of 0.01; the receipts the agent got, in the ledger's order."""
    receipts = []
    for start in range(0, count, 50):
        batch = range(start, min(start + 50, count))
        responses = await asyncio.gather(
            *(
                client.get(
                    VERIFY.format(n=n),
                    headers=pay_direct(stack, wallet, f"GET {VERIFY.format(n=n)}", "0.01"),
                )
                for n in batch
            )
        )
        for response in responses:
            assert response.status_code == 200, response.text
            receipts.append(b64json(response.headers["x-payment-response"]))
    # Sent concurrently, debited in some order: the balance left says which (the ledger's).
    receipts.sort(key=lambda receipt: -to_atomic(receipt["balance"], 6))
    return receipts


async def payers_with_receipts(
    ledger: Ledger, client: httpx.AsyncClient, stack: Stack, counts: list[int]
) -> list[tuple[Identity, list[dict[str, Any]]]]:
    made = []
    for count in counts:
        wallet = await funded_payer(ledger, VERIFY_PRICE * count)
        made.append((wallet, await paid_requests(client, stack, wallet, count)))
    return made


async def settle(stack: Stack, *args: str) -> Run:
    return await x402("settle", "--config", str(stack.config_path), "--flush", *args)


async def settle_crash(stack: Stack, step: str, *args: str) -> Run:
    """A settle pass like `settle`'s that kills its process at `step` (tests/support)."""
    config = str(stack.config_path)
    return await python_module("tests.support.settle_crash", step, "--config", config, *args)


async def assert_exactly_once(ledger: Ledger, public_key: str) -> dict[str, int]:
    """Every receipt in Redis is in exactly one committed batch, batches chain per payer,
    and each manifest's signature and Merkle root hold. Returns receipts per payer."""
    redis = ledger.redis
    per_payer = {}
    async for payer in redis.sscan_iter(keyspace.PAYERS):
        entries = await redis.xrange(keyspace.receipts(payer))
        stream_ids = [stream_id for stream_id, _fields in entries]
        fields_of = dict(entries)
        state = await redis.hgetall(keyspace.settlement(payer))
        assert "claim_first" not in state, f"{payer}: a claim was left behind"
        placed: Counter[str] = Counter()
        previous = "0-0"
        for seq, manifest in enumerate(await settlement.payer_batches(ledger, payer), start=1):
            assert batches.verify_manifest(manifest, public_key)
            assert (manifest["payer"], manifest["seq"], manifest["previous"]) == (
                payer,
                seq,
                previous,
            )
            members = await redis.xrange(
                keyspace.receipts(payer), manifest["first"], manifest["last"]
            )
            assert len(members) == manifest["count"]
            placed.update(stream_id for stream_id, _f in members)
            previous = manifest["last"]
            # The anchored root is the root of exactly these receipts.
            leaves = [_leaf(payer, fields_of[stream_id], public_key) for stream_id, _f in members]
            assert manifest["merkle_root"] == leaves_root(leaves)
        assert all(n == 1 for n in placed.values()), f"{payer}: a receipt in two batches"
        assert sorted(placed) == sorted(stream_ids), f"{payer}: a receipt in no batch"
        assert state.get("settled", "0-0") == previous
        per_payer[payer] = len(stream_ids)
    return per_payer


_gateways: dict[str, Identity] = {}


def remember_gateway(stack: Stack) -> None:
    _gateways[stack.gateway_identity.public_key] = stack.gateway_identity


def _leaf(payer: str, fields: dict[str, str], public_key: str) -> bytes:
    from sidecar.core.money import Asset

    gateway = _gateways[public_key]
    receipt = batches.signed_receipt(payer, fields, {"USDF": Asset("USDF", 6)}, gateway)
    return batches.leaf(receipt)


def leaves_root(leaves: list[bytes]) -> str:
    return merkle.MerkleTree(leaves).root.hex()


def jsonl_manifests(path: Path) -> list[dict[str, Any]]:
    return settlement.JsonlSink(path).manifests()


ADMIN_TOKEN = "t0ken-" + "x" * 26  # a test secret, written to the stack's admin token file


@pytest.fixture(scope="session")
def admin_stack() -> Iterator[Stack]:
    """Two sidecar workers (metrics aggregate across them) and the admin API with a token."""
    stack = Stack(ROUTES, envoy_routes=ENVOY_ROUTES, workers=2)
    token_file = stack.dir / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    stack.ports["admin_api"] = free_port()
    stack.settings = {
        "listen_admin": f"127.0.0.1:{stack.ports['admin_api']}",
        "admin_token_file": str(token_file),
        "anchor_file": str(stack.dir / "anchors.jsonl"),
    }
    with stack:
        remember_gateway(stack)
        yield stack
