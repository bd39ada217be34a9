-- End a reservation made by exact_reserve.lua, only if it is still this check's.
-- KEYS: the authorization key; optionally the payment's outcome hash and the payer's kept
--       responses zset (same tag)
-- ARGV: the reservation, then "" to release it, or the settled state
--       ("settled:<transaction>:<owner>") that stays until the authorization expires;
--       then (settled only) the seconds the settled record is kept at least (what `x402
--       reconcile` matches the chain against); then, settled with an outcome key, the
--       response to keep ("" none), the most responses a payer keeps, and the outcome's
--       field/value pairs, recorded for as long as the authorization's own lifetime (its
--       retries are answered with it: exact_reserve.lua)
-- Returns {"ok"} or {"not_reserved", state}.
local state = redis.call('GET', KEYS[1])
if state ~= ARGV[1] then return {'not_reserved', state or ''} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  local ttl = redis.call('PTTL', KEYS[1])  -- the authorization's own lifetime (validBefore)
  local keep = tonumber(ARGV[3] or '0')
  if keep > 0 and ttl < keep * 1000 then redis.call('EXPIRE', KEYS[1], keep) end
  if KEYS[2] and #ARGV > 5 then
    redis.call('HSET', KEYS[2], unpack(ARGV, 6))
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
    keep_response(KEYS[3], KEYS[2], ARGV[4], ARGV[5], clock_ms(), ttl)
  end
end
return {'ok'}
