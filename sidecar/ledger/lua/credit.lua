-- Credit a registered payer exactly once per idempotency key.
-- KEYS: account hash, idempotency key, credits stream (all under the payer's hash tag)
-- ARGV: asset, amount (atomic, > 0), idempotency ttl (seconds), max balance, unix time
-- Returns {"ok", balance} or {"duplicate", balance} or {reason}.
local account, once, credits = KEYS[1], KEYS[2], KEYS[3]
local asset, amount, max_balance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local field = 'balance:' .. asset

if redis.call('EXISTS', account) == 0 then return {'unknown_payer'} end
local balance = tonumber(redis.call('HGET', account, field) or '0')
if redis.call('EXISTS', once) == 1 then return {'duplicate', balance} end
-- Lua numbers are doubles: exact below 2^53, so balances stay below that.
if amount > max_balance - balance then return {'balance_limit', balance} end

local total = redis.call('HINCRBY', account, field, ARGV[2])
redis.call('HINCRBY', account, 'credited:' .. asset, ARGV[2])
redis.call('SET', once, ARGV[2], 'EX', ARGV[3])
redis.call('XADD', credits, '*', 'asset', asset, 'amount', ARGV[2], 'at', ARGV[5])
return {'ok', total}
