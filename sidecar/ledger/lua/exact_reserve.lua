-- Reserve one EIP-3009 authorization (payer, nonce) for the one check that will settle it:
-- concurrent or replayed copies find it taken. Verify alone does not use an authorization
-- up on chain, so without this every copy would verify.
-- A payment already settled and recorded (exact_finish.lua) is a retry: redelivered, or a
-- conflict (money.lua `retried`), never reserved again.
-- KEYS: the authorization key (under the authorizer's hash tag); optionally the payment's
--       outcome hash (same tag)
-- ARGV: deadline (unix ms), the reservation ("reserved:<id>:<owner>"), expiry (unix
--       seconds: validBefore + grace); with the outcome key: the request's fingerprint and
--       the redelivery limit
-- Returns {"ok"}, {"nonce_reused", state}, a retry's answer or {"deadline_passed"}.
local late = past_deadline(ARGV[1], clock_ms())
if late then return late end
if KEYS[2] then
  local again = retried(KEYS[2], ARGV[4], ARGV[5])
  if again then return again end
end
local state = redis.call('GET', KEYS[1])
if state then return {'nonce_reused', state} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return {'ok'}
