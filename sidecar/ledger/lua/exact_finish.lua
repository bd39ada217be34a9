-- End a reservation made by exact_reserve.lua, only if it is still this check's.
-- KEYS: the authorization key
-- ARGV: the reservation, then "" to release it, or the settled state
--       ("settled:<transaction>:<owner>"), then (settled only) the seconds the settled
--       record is kept at least (what `x402 reconcile` matches the chain against)
-- Returns {"ok"} or {"not_reserved", state}.
local state = redis.call('GET', KEYS[1])
if state ~= ARGV[1] then return {'not_reserved', state or ''} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  local keep = tonumber(ARGV[3] or '0')
  if keep > 0 and redis.call('TTL', KEYS[1]) < keep then redis.call('EXPIRE', KEYS[1], keep) end
end
return {'ok'}
