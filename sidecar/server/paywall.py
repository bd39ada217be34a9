"""The paywall: what a person with a browser gets from a priced route (docs/protocol.md §14).

A request without a payment whose `Accept` prefers `text/html` (a browser's navigation)
gets the same 402 as any client (status, `PAYMENT-REQUIRED`, `Cache-Control: no-store`),
with an HTML body instead of the JSON one:

- where the route offers x402 `exact`, the official x402 paywall page (PyPI `x402`'s
  `x402.http.paywall`, the bundle of npm `@x402/paywall`): it connects the visitor's
  injected wallet (EIP-1193), signs the EIP-3009 authorization and requests the page's
  own URL again with `PAYMENT-SIGNATURE`, then shows what the service answered;
- where it offers only prepaid payments, a short page saying how an agent wallet pays it
  (no wallet button that could not work).

The official page is ~2.3 MB of inline script: it is built once per route and offer and
kept (`Paywall.page`) as pieces around the resource URL, the one thing that differs from
one request to the next; the bundle itself is one copy all routes share. The check only
tests `Accept`, and only on the unpaid path.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
from typing import Any

from sidecar.core import exact
from sidecar.core.decision import Denial, Gateway, Request
from sidecar.core.pricing import Price
from sidecar.core.protocol import DISCOVERY_PATH, X402_VERSION
from sidecar.server.paywall_settings import PaywallSettings

HTML = "text/html; charset=utf-8"
# Stands for the request's URL while the page is built; replaced by each request's own.
_PLACEHOLDER = "x402-sidecar-paywall-resource-url"
MAX_PAGES = 512  # pages kept (route, method, offer); past it the cache starts again
Pieces = tuple[bytes | None, ...]  # a page around the request's URL (None)


def wants_html(accept: str | None) -> bool:
    """Whether `Accept` prefers HTML: its first media range is text/html, as a browser's
    navigation sends (`text/html,application/xhtml+xml,…`). curl (`*/*`), the official
    clients and a page's own fetch() do not."""
    return accept is not None and accept.lstrip()[:9].lower() == "text/html"


class Paywall:
    """The pages of one gateway, built on first use per route, method and offer. A page is
    kept as pieces around the resource URL (`None` marks its place); the official bundle's
    pieces before and after its configuration are one copy every route's page shares."""

    def __init__(self, settings: PaywallSettings, gateway: Gateway) -> None:
        self.settings = settings
        self.gateway = gateway
        self._pages: dict[tuple[str, ...], Pieces] = {}

    def answer(self, denial: Denial, request: Request, price: Price) -> Denial | None:
        """The unpaid 402 `denial` as a browser gets it on this route: the same status and
        headers, the page as its body; None where the route's paywall is off."""
        if not self.settings.on_for(price.route):
            return None
        url = _json(request.base_url(self.gateway) + request.path)
        body = b"".join(url if piece is None else piece for piece in self.page(request, price))
        headers = [(name, value) for name, value in denial.headers if name != "content-type"]
        headers.insert(0, ("content-type", HTML))
        return dataclasses.replace(denial, body=body, headers=tuple(headers))

    def page(self, request: Request, price: Price) -> Pieces:
        """The route's page in pieces, `None` where the request's URL goes."""
        offer = self._offer(price)
        key = (price.route, request.method, price.description, json.dumps(offer, sort_keys=True))
        found = self._pages.get(key)
        if found is None:
            if len(self._pages) >= MAX_PAGES:
                self._pages.clear()
            if offer is None:
                found = (self._prepaid(price),)
            else:
                found = _framed(self._official(price, offer))
            self._pages[key] = found
        return found

    def warm(self) -> None:
        """Load the official bundle now (at start), not at a visitor's first request."""
        if self.settings.anywhere and self.gateway.exact is not None:
            _frame()

    def _offer(self, price: Price) -> dict[str, Any] | None:
        """The route's `exact` offer, as its 402 lists it; None where it has none (a
        metered route, or an asset no token backs)."""
        terms = self.gateway.exact
        onchain = terms.for_price(price) if terms is not None else None
        if terms is None or onchain is None or (price.phase is not None and price.phase.metered):
            return None
        return exact.offer(onchain, price.amount, terms).to_wire()

    def _official(self, price: Price, offer: dict[str, Any]) -> str:
        """The official page for `offer`. Its `currentUrl` is empty: the page's fetch("")
        requests the page's own URL again, query string included."""
        from x402.http.paywall import create_paywall, evm_paywall
        from x402.schemas import PaymentRequired

        required = PaymentRequired.model_validate(
            {
                "x402Version": X402_VERSION,
                "error": "payment_required",
                "resource": {
                    "url": _PLACEHOLDER,
                    "description": price.description,  # "": the page says the price only
                    "mimeType": "application/json",
                },
                "accepts": [offer],
            }
        )
        builder = create_paywall().with_network(evm_paywall)
        builder.with_config(app_name=self.settings.app_name, app_logo=self.settings.app_logo)
        return builder.build().generate_html(required)

    def _prepaid(self, price: Price) -> bytes:
        """A route paid only with prepaid proofs: how an agent wallet pays it."""
        name = html.escape(self.settings.app_name or "Payment required")
        cost = html.escape(f"{price.display} {price.asset.code}")
        what = html.escape(price.description or "This resource")
        logo = self.settings.app_logo
        image = f'<img src="{html.escape(logo)}" alt="" height="48">' if logo else ""
        return _PREPAID_PAGE.format(
            name=name, cost=cost, what=what, logo=image, discovery=DISCOVERY_PATH
        ).encode()


@functools.cache
def _frame() -> tuple[str, bytes, bytes]:
    """The official EVM bundle split where the page's configuration goes (`</head>`)."""
    from x402.http.paywall.evm_paywall_template import EVM_PAYWALL_TEMPLATE as template

    cut = template.index("</head>")
    return template, template[:cut].encode(), template[cut:].encode()


def _framed(page: str) -> Pieces:
    """An official page in pieces around the resource URL (its placeholder); the bundle
    before and after the page's configuration is the shared copy. A page of another shape
    than template + configuration is kept whole (still around the URL)."""
    template, before, after = _frame()
    cut = template.index("</head>")
    tail = len(template) - cut
    framed = page[:cut] + page[len(page) - tail :] == template
    middle = page[cut : len(page) - tail] if framed else page
    head, found, rest = middle.encode().partition(_json(_PLACEHOLDER))
    pieces: Pieces = (head, None, rest) if found else (head,)
    return (before, *pieces, after) if framed else pieces


def _json(value: str) -> bytes:
    from x402.http.utils import htmlsafe_json_dumps

    return htmlsafe_json_dumps(value).encode()


# No script; one <style> block (docs/configuration.md: the paywall and a CSP).
_PREPAID_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name} - Payment Required</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;
color:#111827}}code,pre{{background:#f3f4f6;border-radius:.25rem}}pre{{padding:.75rem;
overflow-x:auto}}</style></head>
<body><main id="x402-prepaid">{logo}
<h1>Payment Required</h1>
<p>{what} costs <strong>{cost}</strong> a request. It is paid by an
<strong>agent wallet</strong> (a prepaid x402 account), not by a browser wallet.</p>
<h2>Pay with an agent wallet</h2>
<pre>pip install x402-sidecar
x402 keygen --out agent.key          # your wallet: prints its public key
x402 topup --amount 1 GATEWAY        # buy credit with USDC (where the gateway offers it),
                                     # or ask the operator to credit your key
x402 pay --wallet agent.key URL</pre>
<p>URL: this page's address. The gateway's price list and keys:
<a href="{discovery}">{discovery}</a>.</p>
</main></body></html>
"""
