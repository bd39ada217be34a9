"""(13): the top-up's latency with durable acknowledgement (WAITAOF after the reservation
and the credit, on the bench's Valkey with its AOF) beside without (`durability.money_in:
off`), in the same run as (10), paid direct, whose path durability does not touch.

Sequential top-ups through Envoy and the real route, each paid by the official x402
client and settled on anvil: the latency is the agent's, from the paid POST to its `200`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
from x402.schemas import PaymentPayload, PaymentRequired

from bench.harness import restart
from sidecar.core.identity import Identity
from sidecar.tools.chain import AnvilChain
from sidecar.tools.load import percentiles
from sidecar.tools.onchain import exact_client
from sidecar.tools.stack import Stack, free_port

TOPUPS = 20  # per side: short, the chain's settle dominates each
TOPUP_DURABLE, TOPUP_OFF = "13 top-up, durable (WAITAOF)", "13 top-up, not durable"


async def timed_topups(stack: Stack, chain: AnvilChain, key: str) -> dict[str, Any]:
    """TOPUPS top-ups of 1 USDF, one after another; the paid POST's latency each."""
    client = exact_client(chain.network, chain.token, key, 10**12)
    took: list[float] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        for _ in range(TOPUPS):
            params = {"payer": Identity.generate().public_key, "amount": "1"}
            challenge = await http.post("/x402/topup", params=params)
            decoded = json.loads(base64.b64decode(challenge.headers["payment-required"]))
            payload = await client.create_payment_payload(PaymentRequired.model_validate(decoded))
            assert isinstance(payload, PaymentPayload)
            header = base64.b64encode(payload.model_dump_json(by_alias=True).encode()).decode()
            started = time.perf_counter()
            paid = await http.post(
                "/x402/topup", params=params, headers={"PAYMENT-SIGNATURE": header}
            )
            took.append((time.perf_counter() - started) * 1000)
            if paid.status_code != 200:
                raise SystemExit(f"bench: a top-up answered {paid.status_code}: {paid.text}")
    spent = sum(took) / 1000
    return {"rate": round(TOPUPS / spent, 1), "latency_ms": percentiles(took), "count": TOPUPS}


def topup_phases(
    stack: Stack, chain: AnvilChain, key: str, workers: int, results: dict[str, Any]
) -> None:
    """(13) on the on-chain stack: durable as it runs, then its sidecar again without."""
    phases = results["phases"]
    phases[TOPUP_DURABLE] = asyncio.run(timed_topups(stack, chain, key))
    stack.settings = {**stack.settings, "durability": {"money_in": "off"}}
    restart(stack, free_port(), stack.transport, workers)
    stack.start_sidecar()
    phases[TOPUP_OFF] = asyncio.run(timed_topups(stack, chain, key))
    for name in (TOPUP_DURABLE, TOPUP_OFF):
        latency = phases[name]["latency_ms"]
        print(f"bench: {name:<30} p50 {latency['p50']} ms  p99 {latency['p99']} ms", flush=True)
