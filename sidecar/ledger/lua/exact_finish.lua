-- End a reservation made by exact_reserve.lua, only if it is still this check's.
-- KEYS: the authorization key; optionally the payment's outcome hash (same tag)
-- ARGV: the reservation, then "" to release it, or the settled state
--       ("settled:<transaction>:<owner>") that stays until the authorization expires;
--       then (settled only) the seconds the settled record is kept at least (what `x402
--       reconcile` matches the chain against); then, settled with an outcome key, the
--       outcome's field/value pairs, kept as long as the authorization (its retries are
--       redelivered: exact_reserve.lua)
-- Returns {"ok"} or {"not_reserved", state}.
local state = redis.call('GET', KEYS[1])
if state ~= ARGV[1] then return {'not_reserved', state or ''} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  local keep = tonumber(ARGV[3] or '0')
  if keep > 0 and redis.call('TTL', KEYS[1]) < keep then redis.call('EXPIRE', KEYS[1], keep) end
  if KEYS[2] and #ARGV > 3 then
    redis.call('HSET', KEYS[2], unpack(ARGV, 4))
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
return {'ok'}
