"""A gateway's `/.well-known/x402` as an agent uses it: the parsed document, and one cache
per auth object shared by every way this SDK pays (X402Auth, ChannelAuth).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.agent.exact import Onchain, TopUpTerms
from sidecar.core import protocol
from sidecar.core.errors import AmountError
from sidecar.core.money import Asset
from sidecar.core.pricing import Price, Route, RouteTable, validate_path
from sidecar.core.protocol import VERSION

# A gateway without a usable document is asked again sooner than a good one goes stale.
MISSING_TTL = 30.0


def origin_of(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def path_of(url: httpx.URL) -> str:
    """The path as sent on the wire, without the query: what `resource` names."""
    return url.raw_path.decode("ascii").partition("?")[0]


@dataclass(frozen=True)
class Discovery:
    """A gateway's `/.well-known/x402`: its payee, its keys and its price list."""

    payee: str
    keys: dict[str, str]  # kid → base64url public key
    routes: RouteTable
    max_direct_ttl: int
    onchain: tuple[Onchain, ...] = ()  # tokens that back ledger assets (`exact`)
    topup: TopUpTerms | None = None  # where to buy prepaid credit, if the gateway sells it

    @classmethod
    def parse(cls, doc: Any) -> Discovery | None:
        """None when the document is not a usable fth-x402/2.0 discovery document."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            return None
        payee, ttl = doc.get("payee"), doc.get("max_direct_ttl_seconds")
        if not isinstance(payee, str) or type(ttl) is not int:
            return None
        keys = {
            k["kid"]: k["public_key"]
            for k in doc.get("keys") or []
            if isinstance(k, dict)
            and isinstance(k.get("kid"), str)
            and isinstance(k.get("public_key"), str)
        }
        assets = {
            a["asset"]: Asset(a["asset"], a["decimals"])
            for a in doc.get("assets") or []
            if isinstance(a, dict)
            and isinstance(a.get("asset"), str)
            and type(a.get("decimals")) is int
            and 0 <= a["decimals"] <= 18
        }
        routes = []
        for spec in doc.get("routes") or []:
            route = _route(spec, assets)
            if route is not None:
                routes.append(route)
        default = next(iter(assets), "USDF")
        onchain = [Onchain.parse(spec) for spec in doc.get("onchain") or []]
        return cls(
            payee,
            keys,
            RouteTable(routes, assets, default),
            ttl,
            tuple(entry for entry in onchain if entry is not None),
            TopUpTerms.parse(doc.get("topup")),
        )

    def price(self, method: str, path: str) -> Price | None:
        """The same matcher the sidecar uses, over the published price list (None: free)."""
        price = self.routes.lookup(method, path)
        return price if price is not None and price.amount else None


def _route(spec: Any, assets: Mapping[str, Asset]) -> Route | None:
    """One price-list entry, or None if it is not one we can pay from (skipped, not fatal)."""
    if not isinstance(spec, dict):
        return None
    method, path, price, code = (spec.get(k) for k in ("method", "path", "price", "asset"))
    if not all(isinstance(v, str) for v in (method, path, price, code)):
        return None
    asset = assets.get(str(code))
    if asset is None:
        return None
    try:
        validate_path(str(path))
        amount = asset.to_atomic(str(price))
    except (ValueError, AmountError):
        return None
    if amount == 0:
        return None
    name = f"{method} {path}"
    return Route(name, str(method), str(path), Price(name, amount, asset))


@dataclass(frozen=True)
class Cached:
    discovery: Discovery | None  # None: the origin has no usable discovery document
    expires: float


class DiscoveryCache:
    """Discovery documents per origin, safe to share across threads and tasks: a good
    document is kept `ttl` seconds, a missing or unusable one at most MISSING_TTL."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, Cached] = {}
        self._lock = threading.Lock()

    def fresh(self, origin: str) -> Cached | None:
        """The entry for `origin` if it has not expired (its discovery may be None)."""
        entry = self._entries.get(origin)
        return entry if entry is not None and entry.expires > time.monotonic() else None

    def last(self, origin: str) -> Discovery | None:
        """The last document fetched for `origin`, stale or not."""
        entry = self._entries.get(origin)
        return entry.discovery if entry is not None else None

    def store(self, origin: str, response: httpx.Response) -> Discovery | None:
        """Parse a discovery response and keep it; None when it is not a usable document.
        A 5xx changes nothing: the last document fetched stays the answer.

        A price list is the price list of the origin that served it: a client that follows
        redirects may hand us another origin's document (`response.url`, the last hop),
        which is kept for that origin, never for `origin` (a server that redirects its
        /.well-known/x402 to a gateway would get proofs signed for that gateway)."""
        if response.status_code >= 500 and origin_of(response.url) == origin:
            # A gateway restarting or overloaded: keep the last good document rather
            # than caching "none" (its keys verify receipts meanwhile).
            return self.last(origin)
        discovery = None
        if response.status_code == 200:
            try:
                discovery = Discovery.parse(response.json())
            except (ValueError, UnicodeDecodeError):
                discovery = None
        served = origin_of(response.url)
        if served != origin:
            self._keep(served, discovery)
            discovery = None
        self._keep(origin, discovery)
        return discovery

    def _keep(self, origin: str, discovery: Discovery | None) -> None:
        ttl = self.ttl if discovery is not None else min(self.ttl, MISSING_TTL)
        with self._lock:
            self._entries[origin] = Cached(discovery, time.monotonic() + ttl)

    def forget(self, origin: str | None = None) -> None:
        """Drop cached documents (all, or one origin like http://host:port)."""
        with self._lock:
            if origin is None:
                self._entries.clear()
            else:
                self._entries.pop(origin, None)

    @staticmethod
    def request(request: httpx.Request) -> httpx.Request:
        """The GET of the discovery document of `request`'s origin."""
        url = request.url.copy_with(path=protocol.DISCOVERY_PATH, query=None, fragment=None)
        return httpx.Request("GET", url, headers={"accept": "application/json"})
