-- Paid requests, each with its own pre-signed direct proof: a proof is good once, so
-- every request must carry a fresh one. Thread i reads <prefix>.<i>; a thread that runs out
-- sends a junk header (a 400, counted) and says how often in "exhausted". The header is
-- X-Payment unless the second argument names another (PAYMENT-SIGNATURE for x402 v2 `exact`).
dofile("report.lua")

local requests, count, sent = {}, 0, 0
exhausted = 0

function init(args)
  local prefix = args[1]
  local header = args[2] or "X-Payment"
  for line in io.lines(prefix .. "." .. id) do
    count = count + 1
    requests[count] = wrk.format("GET", nil, { [header] = line })
  end
  junk = wrk.format("GET", nil, { [header] = "exhausted" })
end

function request()
  sent = sent + 1
  if sent > count then
    exhausted = exhausted + 1
    return junk
  end
  return requests[sent]
end
