-- End a reservation made by exact_reserve.lua, only if it is still this check's.
-- KEYS: the authorization key; optionally the payment's outcome hash and the payer's kept
--       responses zset (same tag)
-- ARGV: the reservation, then "" to release it, or the settled state
--       ("settled:<transaction>:<owner>") that stays until the authorization expires;
--       then, settled with an outcome key, the response to keep ("" none), the most
--       responses a payer keeps, and the outcome's field/value pairs, recorded for as long
--       as the authorization (its retries are answered with it: exact_reserve.lua)
-- Returns {"ok"} or {"not_reserved", state}.
local state = redis.call('GET', KEYS[1])
if state ~= ARGV[1] then return {'not_reserved', state or ''} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  if KEYS[2] and #ARGV > 4 then
    redis.call('HSET', KEYS[2], unpack(ARGV, 5))
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
    keep_response(KEYS[3], KEYS[2], ARGV[3], ARGV[4], clock_ms(), ttl)
  end
end
return {'ok'}
