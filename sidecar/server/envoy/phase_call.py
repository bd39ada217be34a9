"""The response phase over HTTP (`transport: http`): a Lua filter's call to the sidecar.

Envoy 1.40's ext_proc `http_service` sends no body, and the response phase needs one on
most held routes (the kept response of server/replays.py). Its gRPC stream carries one, at
a price: two messages each way per response, about half of a held request's CPU in the
sidecar and a third of Envoy's (docs/performance.md). So over HTTP the phase is one POST
from Envoy's Lua filter (`httpCall`) on the routes that enable it: the check's ext_authz
metadata and the response's headers as headers, the body (when the sidecar keeps it and it
fits the edge's buffer) as the POST's, to the checks' listener (contract.PROCESS_PATH,
answered by server/processing/http_transport.py). The headers wait for the answer, so the
receipt is set before anything reaches the client.

Fail closed: any answer but the sidecar's 200 (down, too slow: Envoy's own 503/504 for the
call) replaces the response with the typed 503 `response_phase_unavailable`, never the
service's answer; the hold nobody captured expires and the ledger releases it. MCP routes,
whose phase rewrites the body, stay on ext_proc over gRPC (filters.py).
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.server.envoy import contract
from sidecar.server.envoy.filters import BUFFER_LIMIT_BYTES, TYPES

NAME = "x402.response_phase"  # a Lua filter, enabled per route (route_config)
DROP_NAME = "x402.response_drop"  # the Lua filter after it on the way out (drop_filter)
SOURCE = "phase"  # each filter's one named source
KEEP_MARK, TIMEOUT_MARK = "@KEEP@", "@TIMEOUT_MS@"  # the chart replaces them too
# The typed 503 of Envoy's own failure of the phase (docs/protocol.md §5), as replies.py
# writes ext_proc's; `details` says how the call ended.
UNAVAILABLE = json.dumps(
    {"error": contract.PHASE_UNAVAILABLE, "message": contract.PHASE_UNAVAILABLE_MESSAGE},
    separators=(",", ":"),
)
FAILED_DETAILS = "x402_phase_"  # + call_<its status> (Envoy's 503/504, the sidecar's), or error
# A refusal of a response whose body streams (not read before the call, below): the
# phase's filter cannot touch that body once it has waited for the call, so it hands the
# replacement to DROP_NAME in this header, which empties the body as it passes.
DROP_HEADER = "x-x402-drop"

# A body is read before the call when its length is known and fits the edge's buffer (or a
# 204/304 has none): then a refusal can replace it. Any other streams on after the headers;
# its refusal goes through DROP_HEADER. `keep`: the read body goes to the sidecar too.
PHASE_LUA = f"""\
local limit = {BUFFER_LIMIT_BYTES}
local keep = {KEEP_MARK}
local timeout = {TIMEOUT_MARK}
local unavailable = '{UNAVAILABLE[:-1]},"details":"{FAILED_DETAILS}'

-- Replace the response: its headers but CORS's, its status, its body.
local function replace(response, read, status, body, set)
  local headers = response:headers()
  local names = {{}}
  for name, _ in pairs(headers) do
    if name:sub(1, 1) ~= ":" and name:sub(1, 15) ~= "access-control-" then
      names[#names + 1] = name
    end
  end
  for _, name in ipairs(names) do headers:remove(name) end
  headers:replace(":status", status)
  for name, value in pairs(set) do headers:replace(name, value) end
  if read then
    headers:replace("content-length", tostring(#body))
    response:body(true):setBytes(body)
  else
    headers:replace("{DROP_HEADER}", body)
  end
end

-- Envoy's own failure of the phase: the typed 503, never the service's answer.
local function fail(response, read, details)
  replace(response, read, "503", unavailable .. details .. '"}}',
    {{["content-type"] = "application/json", ["cache-control"] = "no-store",
      ["retry-after"] = "1"}})
end

local function phase(response, state)
  local headers = response:headers()
  headers:remove("{DROP_HEADER}")  -- only this filter asks for a drop
  local meta = response:streamInfo():dynamicMetadata():get("{contract.EXT_AUTHZ}")
  if meta == nil then return end
  local call = {{
    [":method"] = "POST", [":path"] = "{contract.PROCESS_PATH}", [":authority"] = "x402",
    ["{contract.PROCESS_HEADER}"] = "{contract.PHASE_RESPONSE}",
    ["{contract.TIMEOUT_HEADER}"] = tostring(timeout),
  }}
  for key, value in pairs(meta) do
    if type(value) == "string" then call["{contract.META_PREFIX}" .. key] = value end
  end
  for name, value in pairs(headers) do
    if name == ":status" then
      call["{contract.STATUS_HEADER}"] = value
    elseif name:sub(1, 1) ~= ":" then
      call["{contract.RESPONSE_PREFIX}" .. name] = value
    end
  end
  local body = ""
  local length = tonumber(headers:get("content-length"))
  local status = headers:get(":status")
  if (length ~= nil and length <= limit) or status == "204" or status == "304" then
    state.read = true
    local buffered = response:body()
    if keep == 1 then
      if buffered ~= nil then body = buffered:getBytes(0, buffered:length()) end
      call["{contract.BODY_HEADER}"] = "{contract.WHOLE_BODY}"
    end
  end
  local answer, replacement = response:httpCall("x402_authz_http", call, body, timeout)
  local answered = answer[":status"]
  if answered ~= "200" then return fail(response, state.read, "call_" .. tostring(answered)) end
  local set = {{}}
  for name, value in pairs(answer) do
    if name:sub(1, {len(contract.SET_PREFIX)}) == "{contract.SET_PREFIX}" then
      set[name:sub({len(contract.SET_PREFIX) + 1})] = value
    end
  end
  local instead = answer["{contract.REPLACE_HEADER}"]
  if instead ~= nil then return replace(response, state.read, instead, replacement or "", set) end
  -- (handles taken before a yield are void after it: the headers are asked for again)
  headers = response:headers()
  for name, value in pairs(set) do headers:replace(name, value) end
  if answer["{contract.REPLACE_BODY_HEADER}"] ~= nil then
    if not state.read then error("a body to replace that was not read") end
    headers:replace("content-length", tostring(#replacement))
    response:body(true):setBytes(replacement)
  end
  local removed = answer["{contract.REMOVE_HEADER_LIST}"]
  if removed ~= nil then
    for name in removed:gmatch("[^,]+") do headers:remove(name) end
  end
end

-- A script error would let the response through as it is: caught, it is the typed 503.
function envoy_on_response(response)
  local state = {{read = false}}
  local ok, err = pcall(phase, response, state)
  if not ok then
    response:logErr("x402 response phase: " .. tostring(err))
    fail(response, state.read, "error")
  end
end
"""

# After the phase's filter on the way out: a refused response whose body streams has its
# body emptied chunk by chunk, the first chunk carrying the replacement (no content-length:
# chunked to the client). Anything else passes untouched.
DROP_LUA = f"""\
function envoy_on_response(response)
  local headers = response:headers()
  local replacement = headers:get("{DROP_HEADER}")
  if replacement == nil then return end
  headers:remove("{DROP_HEADER}")
  local first = true
  for chunk in response:bodyChunks() do
    chunk:setBytes(first and replacement or "")
    first = false
  end
end
"""


def phase_source(keep: bool, timeout_ms: int) -> str:
    """The phase filter's Lua: `keep`, the read body goes to the sidecar (kept responses);
    `timeout_ms`: how long Envoy waits for the sidecar's answer."""
    return PHASE_LUA.replace(KEEP_MARK, "1" if keep else "0").replace(TIMEOUT_MARK, str(timeout_ms))


def _lua(name: str, source: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": f"{TYPES}.filters.http.lua.v3.Lua",
            "source_codes": {SOURCE: {"inline_string": source}},
        },
    }


def phase_filters(keep: bool, timeout_ms: int) -> list[dict[str, Any]]:
    """The drop filter, then the phase's (the order out is the reverse): each runs only
    where a route names its source (route_configs)."""
    return [_lua(DROP_NAME, DROP_LUA), _lua(NAME, phase_source(keep, timeout_ms))]


def route_configs() -> dict[str, dict[str, Any]]:
    """A held route's: both filters run on it."""
    config = {"@type": f"{TYPES}.filters.http.lua.v3.LuaPerRoute", "name": SOURCE}
    return {DROP_NAME: config, NAME: dict(config)}
