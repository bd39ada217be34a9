"""The request-header limit, answered with a readable 431 (docs/security.md, "Limits").

Envoy's HTTP codec answers a header block over `max_request_headers_kb` with a 431, then
stops reading and closes the connection: the rest of the request is left unread, so the
kernel ends the connection with a reset, and a client still sending its headers (or one
behind a proxy that drops the answer with the reset) sees "connection reset" instead of
the 431. So the codec's limit is set to twice the configured one (`codec_headers_kb`), and
the first HTTP filter, once the whole header block was read, answers a block over the
configured limit with the 431 itself: a local reply on a complete request, which the
local-reply mappers put in the JSON envelope (`headers_too_large`) and after which the
connection stays usable. Only a block over twice the limit still meets the codec's close.
The size is counted as Envoy counts it (every name and value, pseudo-headers included).

The same filter, in the same pass over the headers, strips the dashboard's session cookie
(browser.strip_cookie_source): every request runs one Lua filter, not two (each costs a
Lua coroutine per request; merged, Envoy alone answered ~1.19x the requests, median of 5
interleaved runs, docs/performance.md).
"""

from __future__ import annotations

from typing import Any

from sidecar.server.envoy.browser import strip_cookie_source
from sidecar.server.envoy.filters import TYPES

NAME = "x402.headers_limit"  # a Lua filter (its typed_config says so), named apart
MAX_CODEC_KB = 8192  # Envoy's own ceiling for max_request_headers_kb
LIMIT_MARK = "@LIMIT_BYTES@"  # replaced by the limit in bytes (the chart does the same)

HEADERS_LIMIT_LUA = f"""\
local limit = {LIMIT_MARK}
{strip_cookie_source()}function envoy_on_request(request)
  local headers = request:headers()
  local size, cookies = 0, false
  for name, value in pairs(headers) do
    size = size + #name + #value
    if name == "cookie" then cookies = true end
  end
  if size > limit then
    request:respond({{[":status"] = "431"}}, "")
    return
  end
  if cookies then strip_dashboard_cookie(headers) end
end
"""


def codec_headers_kb(limit_kb: int) -> int:
    """The codec's own limit: room for the filter to read a block over `limit_kb` whole."""
    return min(MAX_CODEC_KB, 2 * limit_kb)


def headers_limit_source(limit_kb: int) -> str:
    return HEADERS_LIMIT_LUA.replace(LIMIT_MARK, str(limit_kb * 1024))


def headers_limit_filter(limit_kb: int) -> dict[str, Any]:
    """The first HTTP filter: a header block over `limit_kb` KiB gets the 431; the
    dashboard's cookie is stripped from the others."""
    return {
        "name": NAME,
        "typed_config": {
            "@type": f"{TYPES}.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": headers_limit_source(limit_kb)},
        },
    }
