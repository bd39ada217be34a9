"""The route table the sidecar enforces, as `x402 serve` prints it at start: one line per
route with its price, charge mode and the schemes that pay it."""

from __future__ import annotations

import sys

from sidecar.core import exact, protocol, upto, vouchers
from sidecar.core.decision import Gateway
from sidecar.core.pricing import RouteTable


def route_lines(routes: RouteTable, gateway: Gateway) -> list[str]:
    """The route table the sidecar enforces, one line per route: method, pattern, price,
    charge mode and the schemes that pay it (printed by `x402 serve` at start)."""
    rows = []
    for route in routes.routes:
        price, phase = route.price, route.price.phase
        schemes = [protocol.SCHEME, vouchers.SCHEME]
        if phase is not None and phase.metered:
            amount = f"{price.asset.to_decimal(phase.unit_price)} {price.asset.code}/{phase.unit}"
            mode = f"metered (hold {price.display} {price.asset.code}, max {phase.max_units})"
        else:
            amount = f"{price.display} {price.asset.code}" if price.amount else "free"
            mode = "on_success" if phase is not None else "on_check"
            if gateway.exact is not None and gateway.exact.for_price(price) is not None:
                schemes.append(exact.SCHEME)
        onchain = gateway.exact is not None and gateway.exact.for_price(price) is not None
        if phase is not None and onchain:  # once the facilitator lists it (core/upto.py)
            schemes.append(upto.SCHEME)
        if price.mcp is not None:  # an MCP server's tools, per call
            listed = price.mcp.listing(price.asset)
            default = price.asset.to_decimal(price.mcp.default) if price.mcp.default else "free"
            tools = ", ".join(f"{name} {amount}" for name, amount in listed.items())
            amount = f"MCP tools ({price.asset.code}): {tools}; others {default}"
        if not price.amount:
            mode, schemes = "-", []
        rows.append((route.method, route.path, amount, mode, ",".join(schemes) or "-"))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
        for row in rows
    ]


def print_route_table(routes: RouteTable, gateway: Gateway) -> None:
    unlisted = "served free" if routes.unlisted == "pass" else "refused: 404 unknown_route"
    print(
        f"x402 serve: {len(routes.routes)} routes enforced; unlisted: {routes.unlisted} "
        f"(a path no route lists is {unlisted})",
        file=sys.stderr,
    )
    for line in route_lines(routes, gateway):
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()
