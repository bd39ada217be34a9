-- Place a hold for one proof, all or nothing: the payer's expired holds are released
-- first; payer known and active, nonce unused, balance covers the amount -> move the
-- amount from balance to held, mark the nonce (holding the hold id, the future receipt
-- id) and record the hold with its expiry. The response phase captures or releases it.
-- A payment whose hold was captured is a retry (hold_close.lua recorded its outcome under
-- the hold JSON's `outcome` key): redelivered or a conflict (money.lua `retried`).
-- KEYS: account hash, nonce key, holds hash, hold expiries zset, the payment's outcome
--       hash (the payer's hash tag)
-- ARGV: deadline (unix ms), asset, amount (atomic), nonce expiry (unix s), hold id,
--       lifetime (ms), nonce key prefix, hold JSON {asset, held, nonce, record, outcome,
--       fp}, the request's fingerprint, the redelivery limit
-- Returns {"ok", balance} or {reason} or {"insufficient_funds", balance} or
-- {"nonce_reused", receipt id} or {"payment_in_progress", hold id} or a retry's answer or {"deadline_passed"} (the caller
-- answered 503: nothing).
local account, nonce_key, holds, expiries = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local asset, amount, hold_id = ARGV[2], tonumber(ARGV[3]), ARGV[5]

local now = clock_ms()
local late = past_deadline(ARGV[1], now)
if late then return late end
sweep_holds(account, holds, expiries, ARGV[7], now, 16)
-- A proof whose hold is still open: not charged yet, so not `nonce_reused`.
local function in_progress()
  local spent = redis.call('GET', nonce_key)
  if spent and redis.call('HEXISTS', holds, spent) == 1 then
    return {'payment_in_progress', spent}
  end
  return nil
end
local refused = retried(KEYS[5], ARGV[9], ARGV[10]) or in_progress()
  or charge_refused(account, nonce_key, asset, amount)
if refused then return refused end

local expires = now + tonumber(ARGV[6])
local left = redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[3])
redis.call('HINCRBY', account, 'held:' .. asset, ARGV[3])
redis.call('SET', nonce_key, hold_id)
-- The nonce outlives both the proof and the hold: a proof is spent until its hold is
-- captured or released.
redis.call('EXPIREAT', nonce_key, math.max(tonumber(ARGV[4]), math.floor(expires / 1000) + 2))
redis.call('HSET', holds, hold_id, ARGV[8])
redis.call('ZADD', expiries, expires, hold_id)
return {'ok', left}
