-- Charge one proof, all or nothing: payer known and active, nonce unused, balance covers
-- the amount -> debit, mark the nonce until the proof expires, append the receipt, record
-- the outcome under the payment's identity (a retry of it is redelivered, never charged).
-- KEYS: account hash, nonce key, receipts stream, outcome hash (all under the payer's tag)
-- ARGV: deadline (unix ms), asset, amount (atomic), nonce expiry (unix seconds), receipt
--       id, fingerprint, redelivery limit, then what the outcome keeps beside the receipt
--       id and balance (issued_at, nonce, invoice id), then the receipt's field/value pairs
-- Returns {"ok", balance} or {reason} or {"insufficient_funds", balance} or
-- {"nonce_reused", the receipt id that spent it}, or a retried payment's answer (money.lua
-- `retried`), or {"deadline_passed"}: the caller has stopped waiting (it answered 503), so
-- nothing moves.
local account, nonce_key, receipts, outcome = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local asset, amount, receipt_id = ARGV[2], tonumber(ARGV[3]), ARGV[5]

local refused = past_deadline(ARGV[1], clock_ms())
  or retried(outcome, ARGV[6], ARGV[7])
  or charge_refused(account, nonce_key, asset, amount)
if refused then return refused end

-- Amounts go to Redis as the caller's integer strings: Lua would print big numbers as 1e+15.
local left = string.format('%d', redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[3]))
redis.call('HINCRBY', account, 'debited:' .. asset, ARGV[3])
redis.call('SET', nonce_key, receipt_id)
redis.call('EXPIREAT', nonce_key, ARGV[4])
redis.call('XADD', receipts, '*', 'receipt_id', receipt_id, 'balance', left, unpack(ARGV, 11))
redis.call('HSET', outcome, 'fp', ARGV[6], 'receipt_id', receipt_id, 'balance', left,
  'issued_at', ARGV[8], 'nonce', ARGV[9], 'invoice_id', ARGV[10])
redis.call('EXPIREAT', outcome, ARGV[4])
return {'ok', left}
