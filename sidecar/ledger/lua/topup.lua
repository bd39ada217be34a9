-- Credit a top-up paid on chain, exactly once per authorization; the payer's account is
-- created on its first credit. A suspended payer is refused (the caller checked before
-- settling too; this is the atomic word).
-- KEYS: account hash, idempotency key, credits stream (all under the payer's hash tag)
-- ARGV: asset, amount (atomic, > 0), idempotency ttl (seconds), max balance, unix time,
--       source (the authorization), transaction hash
-- Returns {"ok", balance, created}, {"duplicate", balance} or {reason, balance}.
local account, once, credits = KEYS[1], KEYS[2], KEYS[3]
local asset, amount, max_balance = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local field = 'balance:' .. asset

local status = redis.call('HGET', account, 'status')
local balance = tonumber(redis.call('HGET', account, field) or '0')
if redis.call('EXISTS', once) == 1 then return {'duplicate', balance} end
if status and status ~= 'active' then return {'payer_suspended', balance} end
if amount > max_balance - balance then return {'balance_limit', balance} end

local created = 0
if not status then
  redis.call('HSET', account, 'status', 'active')
  created = 1
end
local total = redis.call('HINCRBY', account, field, ARGV[2])
redis.call('HINCRBY', account, 'credited:' .. asset, ARGV[2])
redis.call('SET', once, ARGV[7], 'EX', ARGV[3])
redis.call('XADD', credits, '*', 'asset', asset, 'amount', ARGV[2], 'at', ARGV[5],
  'source', ARGV[6], 'transaction', ARGV[7])
return {'ok', total, created}
