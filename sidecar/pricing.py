"""Route pricing: which price, if any, a request pays. Pure and precompiled for the hot path."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from sidecar.errors import AmountError, ConfigError
from sidecar.money import Asset

ANY_METHOD = "*"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATTERN = re.compile(r"/(?:[^{}/]+|\{[A-Za-z_][A-Za-z0-9_]*\}|/)*")
# The per-route annotations Envoy sends as ext_authz context_extensions.
EXT_PRICE, EXT_ASSET, EXT_ROUTE, EXT_DESCRIPTION = (
    "x402.price",
    "x402.asset",
    "x402.route",
    "x402.description",
)


@dataclass(frozen=True, slots=True)
class Price:
    route: str
    amount: int  # atomic units of `asset`
    asset: Asset
    description: str = ""

    @property
    def display(self) -> str:
        return self.asset.to_decimal(self.amount)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    method: str
    path: str  # "/api/v1/trade/verify/{trade_id}"
    price: Price

    @property
    def is_template(self) -> bool:
        return "{" in self.path


def compile_path(path: str) -> re.Pattern[str]:
    """`{param}` matches exactly one non-empty path segment; everything else is literal."""
    parts = _PARAM.split(path)
    regex = "".join(re.escape(p) if i % 2 == 0 else "[^/]+" for i, p in enumerate(parts))
    return re.compile(regex)


def validate_path(path: str) -> None:
    if not isinstance(path, str) or not _PATTERN.fullmatch(path) or "?" in path:
        raise ValueError(
            f"{path!r} is not a path pattern like /api/v1/items/{{item_id}} "
            "(starts with /, no query string, {param} spans a whole segment)"
        )
    for segment in path.split("/"):
        if "{" in segment and not _PARAM.fullmatch(segment):
            raise ValueError(f"{path!r}: a {{param}} must be a whole path segment")


class RouteTable:
    """Exact routes answer from one dict lookup; templated routes are tried in order."""

    def __init__(
        self, routes: Iterable[Route], assets: Mapping[str, Asset], default_asset: str
    ) -> None:
        self.routes = tuple(routes)
        self.assets = dict(assets)
        self.default_asset = default_asset
        self._exact: dict[tuple[str, str], Price] = {}
        self._templates: list[tuple[str, re.Pattern[str], Price]] = []
        for route in self.routes:
            if route.is_template:
                self._templates.append((route.method, compile_path(route.path), route.price))
            else:
                self._exact.setdefault((route.method, route.path), route.price)

    def lookup(self, method: str, path: str) -> Price | None:
        """Price of `method path` (no query string) from the route table, or None if free."""
        price = self._exact.get((method, path)) or self._exact.get((ANY_METHOD, path))
        if price is not None:
            return price
        for route_method, pattern, price in self._templates:
            if route_method in (method, ANY_METHOD) and pattern.fullmatch(path):
                return price
        return None

    def price_for(
        self, method: str, path: str, context_extensions: Mapping[str, str]
    ) -> Price | None:
        """Envoy's per-route `x402.*` context_extensions override the route table."""
        if EXT_PRICE in context_extensions:
            route = context_extensions.get(EXT_ROUTE, "")
            return _extension_price(
                self,
                context_extensions[EXT_PRICE],
                context_extensions.get(EXT_ASSET, ""),
                route or f"{method} {path}",
                context_extensions.get(EXT_DESCRIPTION, ""),
            )
        return self.lookup(method, path)


@lru_cache(maxsize=4096)
def _extension_price(
    table: RouteTable, price: str, asset_code: str, route: str, description: str
) -> Price | None:
    """Parse one annotation once: Envoy sends the same few millions of times."""
    asset = table.assets.get(asset_code or table.default_asset)
    if asset is None:
        raise ConfigError(f"context_extensions {EXT_ASSET}: unknown asset {asset_code!r}")
    try:
        amount = asset.to_atomic(price)
    except AmountError as exc:
        raise ConfigError(f"context_extensions {EXT_PRICE}: {exc}") from None
    return Price(route, amount, asset, description) if amount else None
