-- End a reservation made by exact_reserve.lua, only if it is still this check's.
-- KEYS: the authorization key
-- ARGV: the reservation, then "" to release it, or the settled state
--       ("settled:<transaction>:<owner>") that stays until the authorization expires
-- Returns {"ok"} or {"not_reserved", state}.
local state = redis.call('GET', KEYS[1])
if state ~= ARGV[1] then return {'not_reserved', state or ''} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return {'ok'}
