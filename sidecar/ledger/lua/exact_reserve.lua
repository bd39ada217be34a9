-- Reserve one EIP-3009 authorization (payer, nonce) for the one check that will settle it:
-- concurrent or replayed copies find it taken. Verify alone does not use an authorization
-- up on chain, so without this every copy would verify.
-- KEYS: the authorization key (under the authorizer's hash tag)
-- ARGV: deadline (unix ms), the reservation ("reserved:<id>:<owner>"), expiry (unix
--       seconds: validBefore + grace)
-- Returns {"ok"}, {"nonce_reused", state} or {"deadline_passed"}.
local late = past_deadline(ARGV[1], clock_ms())
if late then return late end
local state = redis.call('GET', KEYS[1])
if state then return {'nonce_reused', state} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return {'ok'}
