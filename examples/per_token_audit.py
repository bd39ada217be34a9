"""Lane 2: a master agent pays a code-generation agent per token, then an audit.

The code-generation API is metered: the gateway holds the most a call may cost (4000
tokens) at the check and captures tokens x unit price once the service reports the tokens
it generated (`x402-usage`). The generated code then goes to a security-audit agent behind
another gateway, at a flat price. Each call is settled on its own, with its own receipt.

    python examples/per_token_audit.py
"""

from __future__ import annotations

from typing import Any

import httpx
import lanes

from sidecar.agent import X402Auth, receipt_of
from sidecar.core.money import to_atomic, to_decimal

GENERATE, AUDIT = "/api/v1/llm/generate", "/api/v1/audit/security"


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    codegen, audit = world.gateways["codegen"], world.gateways["audit"]
    auth = X402Auth(world.wallet(max_amount="0.10", budget="1"), strict=True)
    prices = httpx.get(codegen.url + "/.well-known/x402").json()
    unit_price = next(r["unit_price"] for r in prices["routes"] if r["path"] == GENERATE)
    with httpx.Client(auth=auth, timeout=30) as http:
        prompt = {"prompt": "a Python function that parses ISO dates", "max_tokens": 120}
        if not short:
            prompt["max_tokens"] = 1500
        code = http.post(codegen.url + GENERATE, json=prompt)
        code.raise_for_status()
        generated = receipt_of(code)
        assert generated is not None and generated.verified and generated.units is not None
        # What was captured is exactly tokens x unit price, in integers.
        tokens, price = generated.units, to_atomic(unit_price, 6)
        assert to_atomic(generated.amount, 6) == tokens * price
        print(
            f"codegen: {tokens} tokens x {unit_price} = {generated.amount} USDF "
            f"(held {generated.held}), receipt {generated.receipt_id}"
        )
        report = http.post(audit.url + AUDIT, json={"code": code.json()["text"]})
        report.raise_for_status()
        audited = receipt_of(report)
        assert audited is not None and audited.verified
        print(f"audit: {audited.amount} USDF, receipt {audited.receipt_id}")
    total = to_atomic(generated.amount, 6) + to_atomic(audited.amount, 6)
    print(f"total: {to_decimal(total, 6)} USDF")
    return {
        "lane": "per-token",
        "payer": auth.wallet.public_key,
        "codegen": {
            "tokens": tokens,
            "unit_price": unit_price,
            "amount": generated.amount,
            "receipt": generated.receipt_id,
        },
        "audit": {"amount": audited.amount, "receipt": audited.receipt_id},
        "total": to_decimal(total, 6),
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["per-token"], lane)
