-- Charge one proof, all or nothing: payer known and active, nonce unused, balance covers
-- the amount -> debit, mark the nonce until the proof expires, append the receipt.
-- KEYS: account hash, nonce key, receipts stream (all under the payer's hash tag)
-- ARGV: deadline (unix ms), asset, amount (atomic), nonce expiry (unix seconds), receipt
--       id, then the receipt's other field/value pairs
-- Returns {"ok", balance} or {reason} or {"insufficient_funds", balance} or
-- {"nonce_reused", the receipt id that spent it}, or
-- {"deadline_passed"}: the caller has stopped waiting (it answered 503), so nothing moves.
local account, nonce_key, receipts = KEYS[1], KEYS[2], KEYS[3]
local asset, amount, receipt_id = ARGV[2], tonumber(ARGV[3]), ARGV[5]

local refused = past_deadline(ARGV[1], clock_ms())
  or charge_refused(account, nonce_key, asset, amount)
if refused then return refused end

-- Amounts go to Redis as the caller's integer strings: Lua would print big numbers as 1e+15.
local left = redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[3])
redis.call('HINCRBY', account, 'debited:' .. asset, ARGV[3])
redis.call('SET', nonce_key, receipt_id)
redis.call('EXPIREAT', nonce_key, ARGV[4])
redis.call('XADD', receipts, '*', 'receipt_id', receipt_id, 'balance', string.format('%d', left), unpack(ARGV, 6))
return {'ok', left}
