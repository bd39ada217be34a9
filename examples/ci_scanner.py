"""Lane 6: a CI/CD pipeline paying micro-cent scans, stopped by its budget.

Each diff goes to a vulnerability scanner (0.000004 USDF) and a license checker
(0.000002 USDF), two APIs behind two gateways. The pipeline's wallet has a budget: when the
next scan would pass it, the SDK refuses before signing anything (BudgetExceeded) and the
pipeline stops there, having spent at most its budget.

    python examples/ci_scanner.py
"""

from __future__ import annotations

from typing import Any

import httpx
import lanes

from sidecar.agent import BudgetExceeded, X402Auth, receipt_of
from sidecar.core.money import to_atomic, to_decimal

STEPS = {"scanner": "/api/v1/scan/vulnerabilities", "licenses": "/api/v1/scan/licenses"}


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    budget, diffs = ("0.00005", 12) if short else ("0.001", 200)
    wallet = world.wallet(max_amount="0.00001", budget=budget)
    spent = dict.fromkeys(STEPS, 0)
    scanned, stopped_at = 0, None
    with httpx.Client(auth=X402Auth(wallet, strict=True), timeout=30) as http:
        for diff in range(diffs):
            try:
                for name, path in STEPS.items():
                    body = {"diff": f"commit {diff}: +import requests"}
                    response = http.post(world.gateways[name].url + path, json=body)
                    response.raise_for_status()
                    receipt = receipt_of(response)
                    assert receipt is not None and receipt.verified
                    spent[name] += to_atomic(receipt.amount, 6)
            except BudgetExceeded as refused:
                stopped_at = diff
                print(f"diff {diff}: pipeline stopped by the budget guard: {refused}")
                break
            scanned += 1
    total = sum(spent.values())
    print(f"{scanned} diffs scanned for {to_decimal(total, 6)} of {budget} USDF")
    return {
        "lane": "ci",
        "payer": wallet.public_key,
        "budget": budget,
        "scanned": scanned,
        "stopped_at": stopped_at,
        "spent": {name: to_decimal(amount, 6) for name, amount in spent.items()},
        "total": to_decimal(total, 6),
        "wallet_spent": wallet.spent("USDF"),
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["ci"], lane)
