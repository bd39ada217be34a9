"""`x402 offers`: what agents will be offered, route by route, before anything starts.

Each priced route's challenge is built by the very code the check answers with
(`decision.unpaid` and `decision.deny`, on the Gateway that `x402 serve` builds from the
same config), and its `PAYMENT-REQUIRED` header decoded: the `accepts[]` and `extensions`
shown are the wire's. No Redis, no Envoy, no facilitator is reached; the config's key and
secret files are read, as at start. Only the invoice's id and expiry differ from one 402
to the next.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from sidecar.core import decision, protocol
from sidecar.core.decision import Request
from sidecar.core.errors import ConfigError
from sidecar.server.config import Settings


def preview(settings: Settings, base_url: str = "", now: int | None = None) -> dict[str, Any]:
    """{"routes": [{route, method, path, price, asset, accepts, extensions}], "onchain":
    [the tokens `exact` offers: network, token, decimals, EIP-712 name and version]}."""
    routes, gateway = settings.route_table(), settings.gateway()
    base = urlsplit(base_url or gateway.public_url or "http://localhost")
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ConfigError(f"--url: an http(s) base URL, not {base_url!r}")
    moment = int(time.time()) if now is None else now
    listed = []
    for route in routes.routes:
        if not route.price.amount:
            continue
        method = "GET" if route.method == "*" else route.method
        request = Request(method, route.path, base.netloc, base.scheme)
        denial = decision.deny(
            decision.unpaid(request, route.price), request, route.price, gateway, moment
        )
        required = protocol.decode_header(dict(denial.headers)["payment-required"])
        listed.append(
            {
                "route": route.name,
                "method": route.method,
                "path": route.path,
                "price": route.price.display,
                "asset": route.price.asset.code,
                "accepts": required["accepts"],
                "extensions": required.get("extensions", {}),
            }
        )
    onchain = [
        {
            "asset": token.asset,
            "network": token.network,
            "token": token.token,
            "decimals": token.decimals,
            "name": token.name,
            "version": token.version,
        }
        for token in (gateway.exact.assets.values() if gateway.exact else ())
    ]
    return {"routes": listed, "onchain": onchain}


def render(found: dict[str, Any]) -> str:
    """The preview for a terminal: per route, one line per offer."""
    lines = []
    tokens = {(t["network"], t["token"].lower()): t for t in found["onchain"]}
    for route in found["routes"]:
        lines.append(
            f"{route['route']}  {route['method']} {route['path']}  "
            f"{route['price']} {route['asset']}"
        )
        for offer in route["accepts"]:
            lines.append(
                f"  {offer['scheme']:<16} {offer['network']:<14} {offer['amount']:>12} "
                f"{offer['asset']}  payTo {offer['payTo']}"
            )
            token = tokens.get((offer["network"], str(offer["asset"]).lower()))
            if token is not None:
                domain = json.dumps({"name": token["name"], "version": token["version"]})
                lines.append(f"  {'':<16} decimals {token['decimals']}, EIP-712 domain {domain}")
        if route["extensions"]:
            lines.append(f"  extensions: {', '.join(route['extensions'])}")
    if not found["routes"]:
        lines.append("no priced routes: nothing is offered")
    return "\n".join(lines)
