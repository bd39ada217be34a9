"""Lane 1: a content agent, one wallet, three APIs.

The agent writes a blog post with a text API, an image API and a voice API, each behind
its own gateway (three operators: own Envoy, sidecar, Redis and receipt key). One agent
identity pays all three. It has never been credited anywhere: its first request at each
gateway is refused (`unknown_payer`), so it buys 1 USDF of credit there with an on-chain
`exact` top-up (USDC on the local chain), then pays per request from that credit.

    python examples/content_agent.py            # starts the three gateways and a chain
"""

from __future__ import annotations

from typing import Any

import httpx
import lanes

from sidecar.agent import TOPUP_EXTENSION, TopUp, X402Auth, receipt_of
from sidecar.core.money import to_atomic, to_decimal

CALLS = {  # gateway → what the agent asks it for
    "text": "/api/v1/text/generate",
    "image": "/api/v1/image/generate",
    "voice": "/api/v1/voice/synthesize",
}


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    wallet = world.wallet(max_amount="0.10", budget="5")
    auth = X402Auth(wallet, auto_topup="1", strict=True)  # no credit anywhere: buy 1 USDF
    sections = ["intro"] if short else ["intro", "body", "conclusion"]
    spent = dict.fromkeys(CALLS, 0)  # atomic USDF per API
    topups: dict[str, dict[str, str]] = {}
    receipts: dict[str, list[str]] = {name: [] for name in CALLS}
    with httpx.Client(auth=auth, timeout=120) as http:
        for section in sections:
            for name, path in CALLS.items():
                response = http.post(world.gateways[name].url + path, json={"section": section})
                response.raise_for_status()
                receipt = receipt_of(response)
                assert receipt is not None and receipt.verified
                topup: TopUp | None = response.extensions.get(TOPUP_EXTENSION)
                if topup is not None:
                    topups[name] = {"credited": topup.credited, "tx": topup.transaction}
                    print(f"{name}: topped up {topup.credited} USDF, tx {topup.transaction}")
                spent[name] += to_atomic(receipt.amount, 6)
                receipts[name].append(receipt.receipt_id)
                print(
                    f"{name} {section}: paid {receipt.amount} USDF, receipt "
                    f"{receipt.receipt_id} signed by {receipt.kid}, balance {receipt.balance}"
                )
    for name in CALLS:
        print(f"spent at {name}: {to_decimal(spent[name], 6)} USDF")
    return {
        "lane": "content",
        "payer": wallet.public_key,
        "evm": wallet.evm.address if wallet.evm else "",
        "spent": {name: to_decimal(amount, 6) for name, amount in spent.items()},
        "topups": topups,
        "receipts": receipts,
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["content"], lane)
