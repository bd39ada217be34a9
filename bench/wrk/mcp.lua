-- MCP tool calls: POST /mcp, each body a JSON-RPC tools/call read from <prefix>.<id> (one
-- per line: a paid call carries its own pre-signed payment in params._meta). With the
-- second argument "repeat", the first line is sent again and again (a free call). A
-- thread that runs out sends an empty body (a JSON-RPC error, counted in "exhausted").
dofile("report.lua")

local requests, count, sent = {}, 0, 0
exhausted = 0
local headers = {
  ["Content-Type"] = "application/json",
  ["Accept"] = "application/json, text/event-stream",
  ["MCP-Protocol-Version"] = "2025-06-18",
}

function init(args)
  for line in io.lines(args[1] .. "." .. id) do
    count = count + 1
    requests[count] = wrk.format("POST", nil, headers, line)
  end
  repeating = args[2] == "repeat"
  junk = wrk.format("POST", nil, headers, "")
end

function request()
  sent = sent + 1
  if repeating then
    return requests[1]
  end
  if sent > count then
    exhausted = exhausted + 1
    return junk
  end
  return requests[sent]
end
