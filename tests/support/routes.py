"""The priced routes of the test stacks, like a chart install's."""

from __future__ import annotations

from typing import Any

# Priced both in the sidecar config and as Envoy annotations, like a chart install.
ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {
        "method": "GET",
        "path": "/api/v1/agent/pay-api/atlas",
        "price": "0.25",
        "description": "Atlas agent API",
    },
    "verify": {"method": "GET", "path": "/api/v1/trade/verify/{trade_id}", "price": "0.01"},
    # In the sidecar's route table only: Envoy sends it down the unannotated fallback route.
    "signal": {"method": "GET", "path": "/api/v1/market/signal", "price": "0.0005"},
}
ENVOY_ROUTES: dict[str, dict[str, Any]] = {
    "atlas": ROUTES["atlas"],
    "verify": ROUTES["verify"],
    # Priced by its Envoy annotation alone.
    "annotated": {"method": "POST", "path": "/api/v1/annotated", "price": "0.02"},
}

VERIFY = "/api/v1/trade/verify/T-{n}"  # 0.01 USDF, the route ROUTES["verify"]
VERIFY_PRICE = 10_000
