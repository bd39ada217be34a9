"""Lane 5: an ML pipeline paying per row.

The pipeline finds the data API in the gateway's price list (`/.well-known/x402`), then
pages through it: each page holds the most it may cost (max_units rows) and is charged
rows returned x unit price. One page fails on the service side (500): its hold is released
and it costs nothing; the pipeline fetches it again.

    python examples/per_row_pipeline.py
"""

from __future__ import annotations

from typing import Any

import httpx
import lanes

from sidecar.agent import X402Auth, receipt_of
from sidecar.core.money import to_atomic, to_decimal


def lane(world: lanes.World, short: bool) -> dict[str, Any]:
    gateway = world.gateways["data"].url
    prices = httpx.get(gateway + "/.well-known/x402").json()
    route = next(r for r in prices["routes"] if r.get("unit") == "row")
    print(f"found {route['method']} {route['path']}: {route['unit_price']} per row")
    auth = X402Auth(world.wallet(max_amount=route["price"], budget="1"), strict=True)
    pages = [20, 25, 15] if short else [100] * 8
    rows: list[dict[str, int]] = []
    charged, failed_charged = 0, 0
    with httpx.Client(auth=auth, timeout=30) as http:
        for number, limit in enumerate(pages):
            query: dict[str, Any] = {"limit": limit}
            if number == 1:  # this page fails once on the service side
                failed = http.get(gateway + route["path"], params={**query, "fail": 500})
                receipt = receipt_of(failed)
                assert failed.status_code == 500 and receipt is not None and not receipt.success
                failed_charged += to_atomic(receipt.amount or "0", 6)
                print(f"page {number}: 500 from the service, charged {receipt.amount or '0'}")
            page = http.get(gateway + route["path"], params=query)
            page.raise_for_status()
            receipt = receipt_of(page)
            assert receipt is not None and receipt.verified and receipt.units == limit
            rows.extend(page.json()["rows"])
            charged += to_atomic(receipt.amount, 6)
            print(f"page {number}: {receipt.units} rows, charged {receipt.amount} USDF")
    print(f"ingested {len(rows)} rows for {to_decimal(charged, 6)} USDF")
    return {
        "lane": "per-row",
        "payer": auth.wallet.public_key,
        "rows": len(rows),
        "unit_price": route["unit_price"],
        "charged": to_decimal(charged, 6),
        "failed_page_charged": to_decimal(failed_charged, 6),
    }


if __name__ == "__main__":
    lanes.run(lanes.SPECS["per-row"], lane)
