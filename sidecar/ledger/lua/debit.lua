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

local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) > tonumber(ARGV[1]) then
  return {'deadline_passed'}
end

local status = redis.call('HGET', account, 'status')
if not status then return {'unknown_payer'} end
if status ~= 'active' then return {'payer_suspended'} end
local spent = redis.call('GET', nonce_key)
if spent then return {'nonce_reused', spent} end

local balance = tonumber(redis.call('HGET', account, 'balance:' .. asset) or '0')
if balance < amount then return {'insufficient_funds', balance} end

-- Amounts go to Redis as the caller's integer strings: Lua would print big numbers as 1e+15.
local left = redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[3])
redis.call('HINCRBY', account, 'debited:' .. asset, ARGV[3])
redis.call('SET', nonce_key, receipt_id)
redis.call('EXPIREAT', nonce_key, ARGV[4])
redis.call('XADD', receipts, '*', 'receipt_id', receipt_id, 'balance', string.format('%d', left), unpack(ARGV, 6))
return {'ok', left}
