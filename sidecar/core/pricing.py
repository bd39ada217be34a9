"""Route pricing: which price, if any, a request pays. Pure and precompiled for the hot path."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

from sidecar.core import mcp, phases
from sidecar.core.errors import AmountError, BadRequest, ConfigError, UnknownRoute
from sidecar.core.money import Asset
from sidecar.core.phases import ResponsePhase

ANY_METHOD = "*"
# What a request to a path no route lists gets: through for free, or 404 unknown_route.
UNLISTED = ("pass", "deny")
# A method is a canonical upper-case token (RFC 9110); HTTP/2 lets a client send `get`,
# which many frameworks upper-case and serve from the priced handler.
_COMMON_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_CANONICAL_METHOD = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Path patterns (docs/configuration.md): each segment is a literal, `*` (exactly one
# segment), `{param}` (one segment, named) or, as the last one, `**` (one or more segments:
# the rest of the path). No segment is empty or a dot segment but a trailing slash.
ONE, REST = "*", "**"
_ONE_REGEX, _REST_REGEX = "[^/]+", "[^/].*"
_LITERAL = re.compile(r"[^\s{}*?#]+")
# The per-route annotations Envoy sends as ext_authz context_extensions.
EXT_PRICE, EXT_ASSET, EXT_ROUTE, EXT_DESCRIPTION = (
    "x402.price",
    "x402.asset",
    "x402.route",
    "x402.description",
)
# The name of an annotated Envoy route without `x402.route`: one name for all of them, not
# the request's path, which an outsider chooses on a prefix or regex route (metric labels,
# the annotation cache).
UNNAMED_ROUTE = "annotated"


@dataclass(frozen=True, slots=True)
class Price:
    route: str
    amount: int  # atomic units of `asset`
    asset: Asset
    description: str = ""
    # `charge: on_success` (a hold captured at the response; core/phases.py); None: on_check.
    # A metered route's `amount` is its hold, the quoted maximum.
    phase: ResponsePhase | None = None
    # An MCP route's tool prices (core/mcp.py): `amount` is then its dearest tool's, and
    # the check prices each tools/call by its tool.
    mcp: mcp.ToolPrices | None = None

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
        return is_pattern(self.path)


def segments(path: str) -> list[str]:
    """A pattern's segments after the leading slash: "/a/{x}/" → ["a", "{x}", ""]."""
    return path.split("/")[1:]


def is_pattern(path: str) -> bool:
    """Whether a path has wildcards (`*`, `**`, `{param}`), so a regex matches it."""
    return "{" in path or ONE in path


def _segment_regex(segment: str) -> str:
    if segment == REST:
        return _REST_REGEX
    if segment == ONE or _PARAM.fullmatch(segment):
        return _ONE_REGEX
    return re.escape(segment)


def path_regex(path: str) -> str:
    """The regex (Python's and Envoy's RE2 alike) of a validated pattern: `*` and
    `{param}` match one non-empty segment, `**` one or more; the rest is literal."""
    return "/" + "/".join(_segment_regex(segment) for segment in segments(path))


def compile_path(path: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(path_regex(path), flags)


def fill_params(path: str, value: Callable[[], str]) -> str:
    """A concrete path of a pattern: each wildcard replaced by a fresh `value()`."""
    return "/" + "/".join(
        value() if _segment_regex(segment) in (_ONE_REGEX, _REST_REGEX) else segment
        for segment in segments(path)
    )


def validate_path(path: str) -> None:
    """Refuse a pattern that is not one, or whose meaning is not obvious (ValueError)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{path!r} is not a path pattern: it starts with /")
    if "?" in path or "#" in path:
        raise ValueError(f"{path!r}: a path pattern has no query string or fragment")
    path_segments, params = segments(path), set()
    for i, segment in enumerate(path_segments):
        last = i == len(path_segments) - 1
        if segment == REST and not last:
            raise ValueError(f"{path!r}: ** (the rest of the path) must be the last segment")
        if segment in (ONE, REST) or (segment == "" and last):
            continue
        param = _PARAM.fullmatch(segment)
        if param is not None:
            if param.group(1) in params:
                raise ValueError(f"{path!r}: the parameter {segment} appears twice")
            params.add(param.group(1))
        elif ONE in segment:
            raise ValueError(
                f"{path!r}: a * must be a whole segment (* one segment, ** the rest), "
                f"not part of {segment!r}"
            )
        elif "{" in segment or "}" in segment:
            raise ValueError(f"{path!r}: a {{param}} must be a whole path segment")
        elif segment in ("", ".", ".."):
            raise ValueError(
                f"{path!r}: an empty or dot segment never reaches a route "
                "(Envoy merges slashes and resolves dot segments)"
            )
        elif not _LITERAL.fullmatch(segment):
            raise ValueError(f"{path!r}: {segment!r} is not a path segment")


def refuse_ambiguity(routes: Iterable[Route], case_sensitive: bool = True) -> None:
    """Refuse (ConfigError naming the routes) a table whose meaning depends on the order of
    its routes: the same method and path twice; two priced routes that can match one
    request; a free pattern that can match a priced route's request. A free literal path
    beside a priced pattern is fine: literal paths are matched first (docs/configuration.md)."""
    listed = list(routes)
    for i, one in enumerate(listed):
        for other in listed[:i]:
            witness = _overlap(other, one, case_sensitive)
            if witness is None:
                continue
            names = f"config routes.{other.name}, routes.{one.name}"
            if one.method == other.method and _shape(one.path) == _shape(other.path):
                raise ConfigError(f"{names}: the same route {one.method} {one.path} twice")
            priced = [r for r in (other, one) if r.price.amount]
            if len(priced) == 2:
                raise ConfigError(
                    f"{names}: both priced routes match {witness}; "
                    "priced routes must not overlap (narrow one of the paths)"
                )
            free = other if priced == [one] else one
            if priced and is_pattern(free.path):
                raise ConfigError(
                    f"{names}: the free pattern {free.path} also matches {witness}, a priced "
                    "request; list the free paths literally or narrow the pattern"
                )


def _shape(path: str) -> tuple[str, ...]:
    """A pattern with its parameters unnamed: /a/{x} and /a/* are the same route."""
    return tuple(ONE if _PARAM.fullmatch(s) else s for s in segments(path))


def _overlap(one: Route, other: Route, case_sensitive: bool) -> str | None:
    """A request both routes can match (`METHOD /path`), or None."""
    if ANY_METHOD not in (one.method, other.method) and one.method != other.method:
        return None
    method = one.method if one.method != ANY_METHOD else other.method
    fold = str if case_sensitive else str.casefold
    path = _common(_shape(one.path), _shape(other.path), fold)
    if path is None:
        return None
    return f"{'GET' if method == ANY_METHOD else method} /{'/'.join(path)}"


def _common(
    one: tuple[str, ...], other: tuple[str, ...], fold: Callable[[str], str]
) -> list[str] | None:
    """The segments of a path both shapes match, or None (`x` stands in for wildcards)."""
    if not one or not other:
        return [] if one == other else None
    a, b = one[0], other[0]
    if a == REST or b == REST:  # one or more segments: whatever the other has left
        rest = other if a == REST else one
        if rest[0] == "":  # a trailing slash is an empty segment, which ** never matches
            return None
        return ["x" if s in (ONE, REST) else s for s in rest]
    if a == ONE or b == ONE:
        head = b if a == ONE else a
        if head == "":
            return None
        head = "x" if head == ONE else head
    elif fold(a) == fold(b):
        head = a
    else:
        return None
    tail = _common(one[1:], other[1:], fold)
    return None if tail is None else [head, *tail]


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


class _Patterns:
    """Patterned routes as one compiled alternation per request method, tried in table
    order: a request costs one regex match, however many patterns there are."""

    def __init__(self, routes: Iterable[tuple[str, str, Price | None]], flags: int) -> None:
        listed = list(routes)
        self._by_method: dict[str, tuple[re.Pattern[str], tuple[Price | None, ...]]] = {}
        for method in {ANY_METHOD, *(m for m, _, _ in listed)}:
            chosen = [(p, price) for m, p, price in listed if m in (method, ANY_METHOD)]
            regex = "|".join(f"({path_regex(p)})" for p, _ in chosen)
            prices = (None, *(price for _, price in chosen))  # by group number
            self._by_method[method] = (re.compile(regex or "(?!)", flags), prices)

    def find(self, method: str, path: str) -> tuple[bool, Price | None]:
        """Whether a pattern for `method` (or any method) matches `path`, and its price."""
        regex, prices = self._by_method.get(method) or self._by_method[ANY_METHOD]
        found = regex.fullmatch(path)
        return (False, None) if found is None else (True, prices[found.lastindex or 0])


class RouteTable:
    """Literal paths answer from one dict lookup; patterns from one regex per method, in
    table order (docs/configuration.md: refuse_ambiguity keeps that order from mattering).

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
        self._exact: dict[tuple[str, str], Price] = {}
        # Priced literal routes by their lenient spelling, to recognise the odd ones.
        self._priced_exact: set[tuple[str, str]] = set()
        patterns = [r for r in self.routes if r.is_template]
        for route in self.routes:
            if not route.is_template:
                self._exact.setdefault((route.method, self._key(route.path)), route.price)
                if route.price.amount:
                    self._priced_exact.add((route.method, spelling_probe(route.path)))
        flags = 0 if case_sensitive else re.IGNORECASE
        self._patterns = _Patterns(((r.method, r.path, r.price) for r in patterns), flags)
        lenient = ((r.method, spelling_probe(r.path), None) for r in patterns if r.price.amount)
        self._priced_patterns = _Patterns(lenient, re.IGNORECASE)

    def _key(self, path: str) -> str:
        return path if self.case_sensitive else path.lower()

    def _match(self, method: str, path: str) -> Price | None:
        price = self._exact.get((method, path)) or self._exact.get((ANY_METHOD, path))
        if price is not None:
            return price
        return self._patterns.find(method, path)[1]

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
        # Each method's regex includes the routes for any method (`*`).
        pattern_methods = (method, "GET") if method == "HEAD" else (method,)
        return any(self._priced_patterns.find(m, probe)[0] for m in pattern_methods)

    def price_for(
        self, method: str, path: str, context_extensions: Mapping[str, str]
    ) -> Price | None:
        """The price this request pays, or None if free; raises `BadRequest` for a
        non-canonical method or an odd spelling of a priced path, `UnknownRoute` for an
        unlisted path under `unlisted: deny`. Envoy's per-route `x402.*`
        context_extensions override the route table."""
        if method not in _COMMON_METHODS and not _CANONICAL_METHOD.fullmatch(method):
            raise BadRequest(f"the method {method[:32]!r} is not an upper-case HTTP method")
        if mcp.EXT_MCP_TOOLS in context_extensions:
            return _mcp_price(
                self,
                context_extensions.get(mcp.EXT_MCP_TOOLS, ""),
                context_extensions.get(mcp.EXT_MCP_DEFAULT, ""),
                context_extensions.get(EXT_ASSET, ""),
                context_extensions.get(EXT_ROUTE, "") or UNNAMED_ROUTE,
                context_extensions.get(EXT_DESCRIPTION, ""),
                _phase_annotations(context_extensions),
            )
        if EXT_PRICE in context_extensions or phases.EXT_UNIT_PRICE in context_extensions:
            route = context_extensions.get(EXT_ROUTE, "")
            return _extension_price(
                self,
                context_extensions.get(EXT_PRICE, ""),
                context_extensions.get(EXT_ASSET, ""),
                route or UNNAMED_ROUTE,
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


_PHASE_ANNOTATIONS = tuple(f"x402.{name}" for name in phases.ROUTE_KEYS)


def _phase_annotations(extensions: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A route's response-phase annotations, hashable for `_extension_price`'s cache; the
    common on_check route has none and pays one `in` per key."""
    if phases.EXT_CHARGE not in extensions and phases.EXT_UNIT_PRICE not in extensions:
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
        phase = phases.from_annotations("context_extensions x402", dict(phase_annotations), asset)
    if phase is not None and phase.metered:
        return Price(route, phase.maximum, asset, description, phase)
    try:
        amount = asset.to_atomic(price)
    except AmountError as exc:
        raise ConfigError(f"context_extensions {EXT_PRICE}: {exc}") from None
    return Price(route, amount, asset, description, phase) if amount else None


@lru_cache(maxsize=1024)
def _mcp_price(
    table: RouteTable,
    tools: str,
    default: str,
    asset_code: str,
    route: str,
    description: str,
    phase_annotations: tuple[tuple[str, str], ...] = (),
) -> Price:
    """An MCP route's annotations (core/mcp.py), parsed once."""
    asset = table.assets.get(asset_code or table.default_asset)
    if asset is None:
        raise ConfigError(f"context_extensions {EXT_ASSET}: unknown asset {asset_code!r}")
    prices = mcp.from_annotations(tools, default, asset)
    phase = None
    if phase_annotations:
        phase = phases.from_annotations("context_extensions x402", dict(phase_annotations), asset)
    return Price(route, prices.maximum, asset, description, phase, prices)
