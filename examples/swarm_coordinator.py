"""Lane 3: a swarm coordinator and its specialists, chained paid calls.

A coordinator dispatches tasks to three specialist agents from different providers
(research, writer, reviewer), each an x402 endpoint behind its own gateway. To do a task,
each specialist pays an API below it (search, LLM) with its own wallet: chained paid calls.
Then the roll-up, as the operators' ledgers see it: what the coordinator paid, each
specialist's revenue, what it paid downstream, and its net; and each specialist's revenue
as its operator's dashboard shows it (its JSON API, /api/summary).

    python examples/swarm_coordinator.py
"""

from __future__ import annotations

from typing import Any

import httpx
import lanes

from sidecar.agent import X402Auth, receipt_of
from sidecar.core.money import to_atomic, to_decimal

TASKS = {
    "research": "/api/v1/tasks/research",
    "writer": "/api/v1/tasks/write",
    "reviewer": "/api/v1/tasks/review",
}
BELOW = {"research": "search", "writer": "llm", "reviewer": "search"}


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    coordinator = world.wallet(max_amount="0.10", budget="2")
    paid = dict.fromkeys(TASKS, 0)
    with httpx.Client(auth=X402Auth(coordinator, strict=True), timeout=30) as http:
        for round_ in range(1 if short else 5):
            for name, path in TASKS.items():
                task = {"round": round_, "topic": "x402 for agents"}
                response = http.post(world.gateways[name].url + path, json=task)
                response.raise_for_status()
                receipt = receipt_of(response)
                assert receipt is not None and receipt.verified
                paid[name] += to_atomic(receipt.amount, 6)
                below = response.json()["downstream"]
                print(
                    f"{name}: paid {receipt.amount} ({receipt.receipt_id}); it paid "
                    f"{below['amount']} to {BELOW[name]} ({below['receipt_id']})"
                )
    # The roll-up, from each operator's ledger (the admin view of revenue by payer).
    print(f"\n{'provider':<10} {'revenue':>9} {'paid below':>11} {'net':>9}")
    rollup: dict[str, dict[str, str]] = {}
    for name in TASKS:
        revenue = world.gateways[name].revenue().get(coordinator.public_key, 0)
        spent = world.gateways[BELOW[name]].revenue().get(world.specialists[name], 0)
        rollup[name] = {
            "revenue": to_decimal(revenue, 6),
            "paid_below": to_decimal(spent, 6),
            "net": to_decimal(revenue - spent, 6),
        }
        print(f"{name:<10} {rollup[name]['revenue']:>9} {rollup[name]['paid_below']:>11} "
              f"{rollup[name]['net']:>9}")  # fmt: skip
    # The same revenue as each specialist's operator sees it on the dashboard's API.
    dashboard = {}
    for name in TASKS:
        gateway = world.gateways[name]
        if gateway.dashboard:
            revenue = gateway.dashboard_summary()["revenue"]
            dashboard[name] = next(r["total"] for r in revenue if r["route"] == "task")
            print(f"{name}'s dashboard ({gateway.dashboard}): route task earned {dashboard[name]}")
    total = sum(paid.values())
    print(f"coordinator paid {to_decimal(total, 6)} USDF in all")
    return {
        "lane": "swarm",
        "payer": coordinator.public_key,
        "paid": {name: to_decimal(amount, 6) for name, amount in paid.items()},
        "total": to_decimal(total, 6),
        "rollup": rollup,
        "dashboard": dashboard,
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["swarm"], lane)
