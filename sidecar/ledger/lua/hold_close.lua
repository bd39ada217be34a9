-- Close one hold when its response was seen: capture part or all of it (the rest goes
-- back to the balance; one receipt for the captured amount) or release it whole and free
-- its nonce. A hold past its lifetime is released, never captured.
-- KEYS: account hash, holds hash, hold expiries zset, receipts stream, the payer's kept
--       responses zset (payer's hash tag)
-- ARGV: deadline (unix ms; a capture past it moves nothing), hold id, "capture" or
--       "release", amount to capture (atomic; at most the hold), nonce key prefix,
--       issued_at (unix s), the response to keep ("" none; server/replays.py), the most
--       responses a payer keeps, then extra receipt field/value pairs (e.g. units)
-- A capture also records the payment's outcome (the receipt's fields, and the response
-- within the payer's bound) under the hold's `outcome` key, as long as its nonce is kept:
-- hold.lua answers its retries with it.
-- Returns {"captured", balance, amount, hold JSON}, {"released", balance, held, hold
-- JSON}, {"hold_expired", balance, "0", hold JSON}, {"no_hold"} or {"deadline_passed"}.
local account, holds, expiries, receipts = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local hold_id, mode, prefix = ARGV[2], ARGV[3], ARGV[5]

local now = clock_ms()
local late = mode == 'capture' and past_deadline(ARGV[1], now)
if late then return late end
local raw = redis.call('HGET', holds, hold_id)
if not raw then return {'no_hold'} end
local hold = cjson.decode(raw)
local expiry = tonumber(redis.call('ZSCORE', expiries, hold_id) or '0')

if mode ~= 'capture' or expiry <= now then
  release_hold(account, holds, expiries, prefix, hold_id)
  local balance = redis.call('HGET', account, 'balance:' .. hold.asset) or '0'
  if mode ~= 'capture' then return {'released', balance, hold.held, raw} end
  return {'hold_expired', balance, '0', raw}
end

local held = tonumber(hold.held)
local amount = math.min(tonumber(ARGV[4]), held)
local captured = string.format('%d', amount)
redis.call('HDEL', holds, hold_id)
redis.call('ZREM', expiries, hold_id)
redis.call('HINCRBY', account, 'held:' .. hold.asset, '-' .. hold.held)
if held > amount then
  redis.call('HINCRBY', account, 'balance:' .. hold.asset, string.format('%d', held - amount))
end
if amount > 0 then redis.call('HINCRBY', account, 'debited:' .. hold.asset, captured) end
local left = redis.call('HGET', account, 'balance:' .. hold.asset) or '0'
local fields = {'receipt_id', hold_id, 'balance', left, 'amount', captured, 'issued_at', ARGV[6]}
for name, value in pairs(hold.record) do
  if name ~= 'amount' and name ~= 'issued_at' then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', receipts, '*', unpack(fields))
if hold.outcome then  -- its retries are redelivered with this receipt (hold.lua)
  redis.call('HSET', hold.outcome, 'fp', hold.fp, unpack(fields))
  local ttl = redis.call('PTTL', prefix .. hold.nonce)
  if ttl > 0 then redis.call('PEXPIRE', hold.outcome, ttl) end
  keep_response(KEYS[5], hold.outcome, ARGV[7], ARGV[8], now, ttl)
end
return {'captured', left, captured, raw}
