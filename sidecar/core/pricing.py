"""Route pricing: which price, if any, a request pays. Pure and precompiled for the hot path."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from sidecar.core import holds
from sidecar.core.errors import AmountError, BadRequest, ConfigError, UnknownRoute
from sidecar.core.holds import ResponsePhase
from sidecar.core.money import Asset

ANY_METHOD = "*"
# What a request to a path no route lists gets: through for free, or 404 unknown_route.
UNLISTED = ("pass", "deny")
# A method is a canonical upper-case token (RFC 9110); HTTP/2 lets a client send `get`,
# which many frameworks upper-case and serve from the priced handler.
_COMMON_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_CANONICAL_METHOD = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*")
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
    # `charge: on_success` (a hold captured at the response; core/holds.py); None: on_check.
    # A metered route's `amount` is its hold, the quoted maximum.
    phase: ResponsePhase | None = None

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


def path_regex(path: str) -> str:
    """`{param}` matches exactly one non-empty path segment; everything else is literal."""
    parts = _PARAM.split(path)
    return "".join(re.escape(p) if i % 2 == 0 else "[^/]+" for i, p in enumerate(parts))


def compile_path(path: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(path_regex(path), flags)


def fill_params(path: str, value: Callable[[], str]) -> str:
    """A concrete path of a pattern: each `{param}` replaced by a fresh `value()`."""
    return _PARAM.sub(lambda _m: value(), path)


def validate_path(path: str) -> None:
    if not isinstance(path, str) or not _PATTERN.fullmatch(path) or "?" in path:
        raise ValueError(
            f"{path!r} is not a path pattern like /api/v1/items/{{item_id}} "
            "(starts with /, no query string, {param} spans a whole segment)"
        )
    for segment in path.split("/"):
        if "{" in segment and not _PARAM.fullmatch(segment):
            raise ValueError(f"{path!r}: a {{param}} must be a whole path segment")


def spelling_probe(path: str) -> str:
    """The path as the most lenient framework would route it: percent-decoded, backslashes
    as slashes, lower case, `;params` and dot segments resolved, a trailing slash and a
    format suffix (`.json`) dropped. Only used to recognise odd spellings of priced paths."""
    segments: list[str] = []
    for segment in unquote(path).replace("\\", "/").lower().split("/"):
        segment = segment.partition(";")[0]
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    if segments:
        stem, dot, _suffix = segments[-1].rpartition(".")
        if dot and stem:
            segments[-1] = stem
    return "/" + "/".join(segments)


class RouteTable:
    """Exact routes answer from one dict lookup; templated routes are tried in order.

    A request reaches a route as spelled, HEAD as the GET route, or with one trailing slash
    dropped (and in any case, with `case_sensitive=False`). Any other spelling of a priced
    path that a lenient framework would route to it (`atlas;x=1`, `ATLAS`, `atlas.json`,
    `atlas\\`) is refused with `bad_request`, never passed free."""

    def __init__(
        self,
        routes: Iterable[Route],
        assets: Mapping[str, Asset],
        default_asset: str,
        unlisted: str = "pass",
        case_sensitive: bool = True,
    ) -> None:
        if unlisted not in UNLISTED:
            raise ConfigError(f"config unlisted: one of {', '.join(UNLISTED)}, not {unlisted!r}")
        self.routes = tuple(routes)
        self.assets = dict(assets)
        self.default_asset = default_asset
        self.unlisted = unlisted
        self.case_sensitive = case_sensitive
        flags = 0 if case_sensitive else re.IGNORECASE
        self._exact: dict[tuple[str, str], Price] = {}
        self._templates: list[tuple[str, re.Pattern[str], Price]] = []
        # Priced routes by their lenient spelling, to recognise the odd ones.
        self._priced_exact: set[tuple[str, str]] = set()
        self._priced_templates: list[tuple[str, re.Pattern[str]]] = []
        for route in self.routes:
            if route.is_template:
                pattern = compile_path(route.path, flags)
                self._templates.append((route.method, pattern, route.price))
                if route.price.amount:
                    lenient = compile_path(spelling_probe(route.path), re.IGNORECASE)
                    self._priced_templates.append((route.method, lenient))
            else:
                self._exact.setdefault((route.method, self._key(route.path)), route.price)
                if route.price.amount:
                    self._priced_exact.add((route.method, spelling_probe(route.path)))

    def _key(self, path: str) -> str:
        return path if self.case_sensitive else path.lower()

    def _match(self, method: str, path: str) -> Price | None:
        price = self._exact.get((method, path)) or self._exact.get((ANY_METHOD, path))
        if price is not None:
            return price
        for route_method, pattern, price in self._templates:
            if route_method in (method, ANY_METHOD) and pattern.fullmatch(path):
                return price
        return None

    def lookup(self, method: str, path: str) -> Price | None:
        """The listed route `method path` (no query string) reaches, free ones (price 0)
        included, or None: as spelled, HEAD as GET, then without one trailing slash."""
        key = self._key(path)
        candidates = [key]
        if len(key) > 1 and key.endswith("/"):
            candidates.append(key[:-1])
        for candidate in candidates:
            price = self._match(method, candidate)
            if price is None and method == "HEAD":  # HEAD runs the GET handler: priced so
                price = self._match("GET", candidate)
            if price is not None:
                return price
        return None

    def resembles_priced(self, method: str, path: str) -> bool:
        """Whether a lenient framework could route this spelling to a priced route."""
        probe = spelling_probe(path)
        methods = (method, ANY_METHOD, "GET") if method == "HEAD" else (method, ANY_METHOD)
        if any((m, probe) in self._priced_exact for m in methods):
            return True
        return any(
            m in methods and pattern.fullmatch(probe) for m, pattern in self._priced_templates
        )

    def price_for(
        self, method: str, path: str, context_extensions: Mapping[str, str]
    ) -> Price | None:
        """The price this request pays, or None if free; raises `BadRequest` for a
        non-canonical method or an odd spelling of a priced path, `UnknownRoute` for an
        unlisted path under `unlisted: deny`. Envoy's per-route `x402.*`
        context_extensions override the route table."""
        if method not in _COMMON_METHODS and not _CANONICAL_METHOD.fullmatch(method):
            raise BadRequest(f"the method {method[:32]!r} is not an upper-case HTTP method")
        if EXT_PRICE in context_extensions or holds.EXT_UNIT_PRICE in context_extensions:
            route = context_extensions.get(EXT_ROUTE, "")
            return _extension_price(
                self,
                context_extensions.get(EXT_PRICE, ""),
                context_extensions.get(EXT_ASSET, ""),
                route or f"{method} {path}",
                context_extensions.get(EXT_DESCRIPTION, ""),
                _phase_annotations(context_extensions),
            )
        price = self.lookup(method, path)
        if price is not None:
            return price if price.amount else None
        if self.resembles_priced(method, path):
            raise BadRequest(
                "this spelling of a priced path is refused; request the path as listed "
                "in /.well-known/x402"
            )
        if self.unlisted == "deny":
            raise UnknownRoute(f"this gateway lists no route for {method} {path[:200]}")
        return None


_PHASE_ANNOTATIONS = tuple(f"x402.{name}" for name in holds.ROUTE_KEYS)


def _phase_annotations(extensions: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A route's response-phase annotations, hashable for `_extension_price`'s cache; the
    common on_check route has none and pays one `in` per key."""
    if holds.EXT_CHARGE not in extensions and holds.EXT_UNIT_PRICE not in extensions:
        return ()
    return tuple((k, extensions[k]) for k in _PHASE_ANNOTATIONS if k in extensions)


@lru_cache(maxsize=4096)
def _extension_price(
    table: RouteTable,
    price: str,
    asset_code: str,
    route: str,
    description: str,
    phase_annotations: tuple[tuple[str, str], ...] = (),
) -> Price | None:
    """Parse one annotation once: Envoy sends the same few millions of times."""
    asset = table.assets.get(asset_code or table.default_asset)
    if asset is None:
        raise ConfigError(f"context_extensions {EXT_ASSET}: unknown asset {asset_code!r}")
    phase = None
    if phase_annotations:
        phase = holds.from_annotations("context_extensions x402", dict(phase_annotations), asset)
    if phase is not None and phase.metered:
        return Price(route, phase.maximum, asset, description, phase)
    try:
        amount = asset.to_atomic(price)
    except AmountError as exc:
        raise ConfigError(f"context_extensions {EXT_PRICE}: {exc}") from None
    return Price(route, amount, asset, description, phase) if amount else None
