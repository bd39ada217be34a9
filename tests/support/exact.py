"""Paying with x402 `exact` in tests: the official client's PAYMENT-SIGNATURE for a
route's 402, and the token balances a payment moves (sidecar/tools/onchain.py runs the
chain side: the facilitator, the settings, the client)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.tools.chain import AnvilChain, DevAccount
from sidecar.tools.onchain import official_client, operator, payment_signature

# The npm packages of the official TypeScript clients (the Makefile's tools target).
NODE_MODULES = Path(
    os.environ.get("X402_NODE_MODULES")
    or Path(__file__).resolve().parents[2] / ".tools/node_modules"
)
TS_CLIENT = Path(__file__).resolve().parent / "interop_client.js"


async def run_node_client(job: dict[str, str]) -> dict[str, Any]:
    """One request paid by an official TypeScript client (interop_client.js; `job` as it
    documents), run by node: its status, decoded PAYMENT-RESPONSE and body."""
    client = job["client"]
    assert (NODE_MODULES / "@x402" / client).is_dir(), f"@x402/{client} missing: make tools"
    process = await asyncio.create_subprocess_exec(
        "node",
        str(TS_CLIENT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    out, err = await asyncio.wait_for(process.communicate(json.dumps(job).encode()), 120)
    assert process.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return answer


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def balances(chain: AnvilChain, payer: str) -> tuple[int, int]:
    """The payer's and the operator's token balances."""
    return chain.balance_of(payer), chain.balance_of(operator(chain).address)


async def sign_exact(
    chain: AnvilChain, http: httpx.AsyncClient, path: str, payer: DevAccount, cap: int,
    amount: int | None = None,
) -> tuple[str, PaymentPayload]:  # fmt: skip
    """What the official client sends for `path`'s 402: the PAYMENT-SIGNATURE value and
    the payload. `amount`: sign for another amount than the offer's (a refused payment)."""
    challenge = await http.get(path)
    assert challenge.status_code == 402
    required = PaymentRequired.model_validate(b64json(challenge.headers["payment-required"]))
    if amount is not None:
        required.accepts = [
            offer.model_copy(update={"amount": str(amount)}) for offer in required.accepts
        ]
    payload = await official_client(chain, payer, cap).create_payment_payload(required)
    assert isinstance(payload, PaymentPayload)
    return payment_signature(payload), payload


async def answer_lost(chain: AnvilChain, send: Awaitable[httpx.Response]) -> httpx.Response:
    """`send` a paid request while anvil mines nothing: the facilitator's settle transaction
    waits in the pool past the sidecar's facilitator_settle_timeout_ms (at most 1 s here),
    so the settle's answer is lost; then the block is mined and the sidecar, watching the
    chain (chain_lookup_ms), finds the transfer."""
    await asyncio.to_thread(chain.automine, False)
    try:
        pending = asyncio.ensure_future(send)
        for _ in range(400):  # the settle's transaction, sent and not mined
            if await asyncio.to_thread(chain.pending_transactions) or pending.done():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # past facilitator_settle_timeout_ms: the outcome is unknown
        await asyncio.to_thread(chain.mine)
    finally:
        await asyncio.to_thread(chain.automine, True)
    return await pending
