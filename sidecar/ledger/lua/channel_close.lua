-- Close a channel, once: refund deposit - cumulative to the balance, count the cumulative
-- amount as debited, and append the final voucher to the receipts stream for settlement.
-- KEYS: account hash, channel hash, open-channels set, receipts stream, and for a request
--       the payer signed itself (self-serve), its nonce key (all under the payer's hash tag)
-- ARGV: channel id, receipt id, now (unix seconds), only if expired ("1"/"0"), and with a
--       nonce key: the request's expiry (unix seconds), until which the nonce stays spent
-- Returns {"ok", refund, balance, cumulative, sequence, receipt id, vouchers accepted}
--      or {"closed", ...the same} (closed before)
--      or {"unknown_channel"} or {"open"} (not expired, only-if-expired was asked)
--      or {"nonce_reused", what spent it}. The nonce is spent only when the answer is a
--      close (now or before).
local account, channel, open, receipts, nonce_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = ARGV[3]

if nonce_key then
  local refused = nonce_refused(nonce_key)
  if refused then return refused end
end
local c = redis.call('HMGET', channel, 'status', 'asset', 'deposit', 'cumulative',
  'sequence', 'payee', 'voucher', 'refund', 'receipt_id', 'expires_at', 'balance_after',
  'vouchers')
local vouchers = c[12] or '0'
if not c[1] then return {'unknown_channel'} end
if nonce_key then
  redis.call('SET', nonce_key, 'close:' .. ARGV[1])
  redis.call('EXPIREAT', nonce_key, ARGV[5])
end
if c[1] == 'closed' then return {'closed', c[8], c[11], c[4], c[5], c[9], vouchers} end
if ARGV[4] == '1' and tonumber(now) <= tonumber(c[10]) then return {'open'} end

local asset = c[2]
local refund = string.format('%d', tonumber(c[3]) - tonumber(c[4]))
local balance = redis.call('HINCRBY', account, 'balance:' .. asset, refund)
redis.call('HINCRBY', account, 'channeled:' .. asset, '-' .. c[3])
redis.call('HINCRBY', account, 'debited:' .. asset, c[4])
balance = string.format('%d', balance)
redis.call('HSET', channel, 'status', 'closed', 'closed_at', now, 'refund', refund,
  'receipt_id', ARGV[2], 'balance_after', balance)
redis.call('SREM', open, ARGV[1])
redis.call('XADD', receipts, '*', 'kind', 'channel', 'receipt_id', ARGV[2],
  'channel_id', ARGV[1], 'asset', asset, 'amount', c[4], 'deposit', c[3], 'refund', refund,
  'sequence', c[5], 'voucher', c[7], 'balance', balance, 'issued_at', now, 'payee', c[6])
return {'ok', refund, balance, c[4], c[5], ARGV[2], vouchers}
