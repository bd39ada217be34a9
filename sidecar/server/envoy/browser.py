"""What browsers see of the gateway in the rendered Envoy config (docs/security.md, "Browsers").

CORS covers only the answers the gateway makes itself: discovery and the top-up (Envoy's
CORS filter on those routes), the preflight of a payment (a route of its own), and every
local reply — the sidecar's 402s and paywall, Envoy's own failures — through the
local-reply mappers. The service's answers, and its own CORS headers and preflights, pass
untouched: no gateway policy covers its routes. The gateway never allows credentials (a
payment is a header, never a cookie). And the dashboard's session cookie, which a browser
sends to every port of its host, is removed from what Envoy forwards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sidecar.server.dashboard.auth import COOKIE
from sidecar.server.envoy import contract
from sidecar.server.envoy.filters import TYPES

CORS = "envoy.filters.http.cors"
CORS_ALLOW_HEADERS = ", ".join(contract.CORS_ALLOW_HEADERS)
CORS_EXPOSE_HEADERS = ", ".join(contract.CORS_EXPOSE_HEADERS)
CORS_ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_MAX_AGE = "600"
ANY_ORIGIN = "*"
# The dashboard's cookie, under its plain name and its `__Host-` (TLS) name.
DASHBOARD_COOKIES = (COOKIE.removeprefix("__Host-"), "__Host-" + COOKIE.removeprefix("__Host-"))


def origin_regex(origins: Sequence[str]) -> str:
    """An RE2 full match of the configured origins; dots escaped as Go's QuoteMeta (and
    the chart's regexQuoteMeta) does, the only metacharacter a checked origin can hold."""
    if ANY_ORIGIN in origins:
        return ".*"
    return "|".join(re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", origin) for origin in origins)


def cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    """The policy of a route the gateway answers itself: the configured origins, never
    credentials."""
    return {
        "@type": f"{TYPES}.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"safe_regex": {"regex": origin_regex(origins)}}],
        "allow_methods": CORS_ALLOW_METHODS,
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "max_age": CORS_MAX_AGE,
    }


def with_cors(route: dict[str, Any], origins: Sequence[str]) -> dict[str, Any]:
    """`route` with the gateway's CORS policy (none when no origin is configured)."""
    if not origins:
        return route
    config = {**route.get("typed_per_filter_config", {}), CORS: cors_policy(origins)}
    return {**route, "typed_per_filter_config": config}


def preflight_route(origins: Sequence[str], service_route: dict[str, Any]) -> list[dict[str, Any]]:
    """A preflight asking to send a payment header, on any path: Envoy answers it for the
    configured origins. Any other preflight (and one from another origin) goes on to the
    service as before."""
    if not origins:
        return []
    headers = [
        {"name": ":method", "string_match": {"exact": "OPTIONS"}},
        {"name": "origin", "present_match": True},
        {
            "name": "access-control-request-headers",
            "string_match": {"safe_regex": {"regex": contract.PAYMENT_PREFLIGHT}},
        },
    ]
    route = {"name": "x402_preflight", "match": {"prefix": "/", "headers": headers}}
    return [with_cors({**route, "route": service_route}, origins)]


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def cors_replies(mappers: list[dict[str, Any]], origins: Sequence[str]) -> list[dict[str, Any]]:
    """The local-reply mappers with CORS on the replies: `*` on every one, or the caller's
    origin when it is a configured one (each mapper first in a copy that also matches the
    origin, then as it was)."""
    if not origins:
        return mappers
    expose = _header("access-control-expose-headers", CORS_EXPOSE_HEADERS)
    if ANY_ORIGIN in origins:
        headers = [_header("access-control-allow-origin", ANY_ORIGIN), expose]
        return [
            {**mapper, "headers_to_add": [*mapper.get("headers_to_add", []), *headers]}
            for mapper in mappers
        ]
    allowed = {
        "header_filter": {
            "header": {
                "name": "origin",
                "string_match": {"safe_regex": {"regex": origin_regex(origins)}},
            }
        }
    }
    headers = [
        _header("access-control-allow-origin", "%REQ(origin)%"),
        expose,
        _header("vary", "origin"),
    ]
    echoed = [
        {
            **mapper,
            "filter": {"and_filter": {"filters": [mapper["filter"], allowed]}},
            "headers_to_add": [*mapper.get("headers_to_add", []), *headers],
        }
        for mapper in mappers
    ]
    return [*echoed, *mappers]


# Lua, because Envoy's header mutations can only add or remove a whole header, and the
# service's own cookies must reach it. Nothing changes for a request without the cookie.
STRIP_COOKIE_LUA = """\
local names = {{{names}}}
local function strip_dashboard_cookie(headers)
  local kept, dropped = {{}}, false
  for i = 0, headers:getNumValues("cookie") - 1 do
    for pair in string.gmatch(headers:getAtIndex("cookie", i), "[^;]+") do
      local crumb = string.match(pair, "^%s*(.-)%s*$")
      local name = string.match(crumb, "^([^=]-)%s*=") or crumb
      if names[name] then dropped = true elseif crumb ~= "" then kept[#kept + 1] = crumb end
    end
  end
  if not dropped then return end
  headers:remove("cookie")
  if #kept > 0 then headers:add("cookie", table.concat(kept, "; ")) end
end
"""


def strip_cookie_source() -> str:
    """`strip_dashboard_cookie(headers)` in Lua, naming the dashboard's cookies: the edge's
    one Lua filter (envoy/headers.py) calls it on a request that carries a cookie."""
    names = ", ".join(f'["{name}"] = true' for name in DASHBOARD_COOKIES)
    return STRIP_COOKIE_LUA.format(names=names)
