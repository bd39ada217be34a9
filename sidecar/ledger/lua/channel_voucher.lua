-- Accept one voucher, all or nothing: payer active, channel open and unexpired, for this
-- asset and payee; sequence above the last; cumulative raised by at least the price and
-- within the deposit -> record it as the channel's latest voucher.
-- KEYS: account hash, channel hash (both under the payer's hash tag)
-- ARGV: deadline (unix ms), asset, cumulative (atomic), sequence, price (atomic), now,
--       payees, voucher JSON, fingerprint of the request, redelivery limit, receipt id.
--       Payees: the gateway's key ids, current and previous, one space between two: a
--       channel opened to a key before a rotation keeps working until it is closed,
--       whichever of the gateway's keys the voucher names.
-- The channel keeps its latest voucher's outcome (fp, receipt_id, issued_at, balance,
-- increment): the same voucher again for the same request is redelivered (money.lua
-- `retried`), at most `limit` times, then stale_voucher; for another request a conflict.
-- Returns {"ok", remaining, increment} or {reason} or {reason, last sequence, last
-- cumulative} (stale_voucher, underpaid_voucher) or {"insufficient_funds", remaining}, or
-- a retry's answer, or {"deadline_passed"}: the caller has stopped waiting (it answered
-- 503), so nothing moves.
local account, channel = KEYS[1], KEYS[2]
local cumulative, sequence = tonumber(ARGV[3]), tonumber(ARGV[4])
local price, now = tonumber(ARGV[5]), tonumber(ARGV[6])

local refused = past_deadline(ARGV[1], clock_ms()) or payer_refused(account)
if refused then return refused end

local c = redis.call('HMGET', channel, 'status', 'asset', 'deposit', 'cumulative',
  'sequence', 'expires_at', 'payee')
if not c[1] or not c[7] or not string.find(' ' .. ARGV[7] .. ' ', ' ' .. c[7] .. ' ', 1, true) then
  return {'unknown_channel'}
end
if c[1] ~= 'open' or now > tonumber(c[6]) then return {'channel_closed'} end
if c[2] ~= ARGV[2] then return {'invoice_mismatch'} end

local deposit, last = tonumber(c[3]), tonumber(c[4])
if sequence <= tonumber(c[5]) then
  if sequence == tonumber(c[5]) and ARGV[3] == c[4] then  -- the latest voucher, again
    local again = retried(channel, ARGV[9], ARGV[10])
    if again and again[1] ~= 'nonce_reused' then return again end
  end
  return {'stale_voucher', c[5], c[4]}
end
if cumulative - last < price then return {'underpaid_voucher', c[5], c[4]} end
if cumulative > deposit then
  return {'insufficient_funds', string.format('%d', deposit - last)}
end

local remaining = string.format('%d', deposit - cumulative)
local increment = string.format('%d', cumulative - last)
redis.call('HSET', channel, 'cumulative', ARGV[3], 'sequence', ARGV[4], 'voucher', ARGV[8],
  'fp', ARGV[9], 'receipt_id', ARGV[11], 'issued_at', ARGV[6], 'balance', remaining,
  'increment', increment, 'redelivered', 0)
redis.call('HINCRBY', channel, 'vouchers', 1)
return {'ok', remaining, increment}
