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
from sidecar.server.envoy.filters import TYPES

NAME = "x402.response_phase"  # a Lua filter, enabled per route (route_config)
SOURCE = "phase"  # its one named source
KEEP_MARK, TIMEOUT_MARK = "@KEEP_BYTES@", "@TIMEOUT_MS@"  # the chart replaces them too
# The typed 503 of Envoy's own failure of the phase (docs/protocol.md §5), as replies.py
# writes ext_proc's; `details` says how the call ended.
UNAVAILABLE = json.dumps(
    {
        "error": "response_phase_unavailable",
        "message": "the payment could not be completed; nothing was charged, retry shortly",
    },
    separators=(",", ":"),
)
FAILED_DETAILS = "x402_phase_"  # + call_<its status> (Envoy's 503/504, the sidecar's), or error

PHASE_LUA = f"""\
local keep = {KEEP_MARK}
local timeout = {TIMEOUT_MARK}
local unavailable = '{UNAVAILABLE[:-1]},"details":"{FAILED_DETAILS}'

-- Replace the response: its headers but CORS's, its status, its body.
local function replace(response, status, body, set)
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
  headers:replace("content-length", tostring(#body))
  response:body(true):setBytes(body)
end

-- Envoy's own failure of the phase: the typed 503, never the service's answer.
local function fail(response, details)
  replace(response, "503", unavailable .. details .. '"}}',
    {{["content-type"] = "application/json", ["cache-control"] = "no-store",
      ["retry-after"] = "1"}})
end

local function phase(response)
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
  for name, value in pairs(response:headers()) do
    if name == ":status" then
      call["{contract.STATUS_HEADER}"] = value
    elseif name:sub(1, 1) ~= ":" then
      call["{contract.RESPONSE_PREFIX}" .. name] = value
    end
  end
  local body = ""
  local length = tonumber(response:headers():get("content-length"))
  if length ~= nil and length <= keep then
    local buffered = response:body()
    if buffered ~= nil then body = buffered:getBytes(0, buffered:length()) end
    call["{contract.BODY_HEADER}"] = "{contract.WHOLE_BODY}"
  end
  local answer, replacement = response:httpCall("x402_authz_http", call, body, timeout)
  local status = answer[":status"]
  if status ~= "200" then return fail(response, "call_" .. tostring(status)) end
  local set = {{}}
  for name, value in pairs(answer) do
    if name:sub(1, {len(contract.SET_PREFIX)}) == "{contract.SET_PREFIX}" then
      set[name:sub({len(contract.SET_PREFIX) + 1})] = value
    end
  end
  local instead = answer["{contract.REPLACE_HEADER}"]
  if instead ~= nil then return replace(response, instead, replacement or "", set) end
  -- (handles taken before a yield are void after it: the headers are asked for again)
  local headers = response:headers()
  for name, value in pairs(set) do headers:replace(name, value) end
  if answer["{contract.REPLACE_BODY_HEADER}"] ~= nil then
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
  local ok, err = pcall(phase, response)
  if not ok then
    response:logErr("x402 response phase: " .. tostring(err))
    fail(response, "error")
  end
end
"""


def phase_source(keep_bytes: int, timeout_ms: int) -> str:
    """The filter's Lua: a body up to `keep_bytes` (by its content-length; 0: none) goes
    to the sidecar; `timeout_ms`: how long Envoy waits for its answer."""
    return PHASE_LUA.replace(KEEP_MARK, str(keep_bytes)).replace(TIMEOUT_MARK, str(timeout_ms))


def phase_filter(keep_bytes: int, timeout_ms: int) -> dict[str, Any]:
    """The Lua filter, running only where a route names its source (route_config)."""
    return {
        "name": NAME,
        "typed_config": {
            "@type": f"{TYPES}.filters.http.lua.v3.Lua",
            "source_codes": {SOURCE: {"inline_string": phase_source(keep_bytes, timeout_ms)}},
        },
    }


def route_config() -> dict[str, Any]:
    """A held route's: the filter runs the phase on it."""
    return {"@type": f"{TYPES}.filters.http.lua.v3.LuaPerRoute", "name": SOURCE}
