-- Open a payment channel: move the deposit from the payer's balance into the channel.
-- KEYS: account hash, channel hash, open-channels set, and for a request the payer signed
--       itself (self-serve), its nonce key (all under the payer's hash tag)
-- ARGV: asset, deposit (atomic, > 0), channel id, payee, expires_at, now (unix seconds),
--       and with a nonce key: the request's expiry (unix seconds), until which the nonce
--       stays spent
-- Returns {"ok", balance} or {"exists"} or {reason} or {"insufficient_funds", balance}
--      or {"nonce_reused", what spent it}. A refusal moves nothing and spends no nonce.
local account, channel, open, nonce_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local asset, deposit = ARGV[1], tonumber(ARGV[2])

local refused = payer_refused(account)
if refused then return refused end
if nonce_key then
  refused = nonce_refused(nonce_key)
  if refused then return refused end
end
if redis.call('EXISTS', channel) == 1 then return {'exists'} end
refused = funds_refused(account, asset, deposit)
if refused then return refused end

-- Money is conserved: credited = balance + channeled (open deposits) + debited.
local left = redis.call('HINCRBY', account, 'balance:' .. asset, '-' .. ARGV[2])
redis.call('HINCRBY', account, 'channeled:' .. asset, ARGV[2])
redis.call('HSET', channel, 'status', 'open', 'asset', asset, 'deposit', ARGV[2],
  'cumulative', '0', 'sequence', '0', 'payee', ARGV[4], 'expires_at', ARGV[5],
  'opened_at', ARGV[6], 'voucher', '')
redis.call('SADD', open, ARGV[3])
if nonce_key then
  redis.call('SET', nonce_key, 'open:' .. ARGV[3])
  redis.call('EXPIREAT', nonce_key, ARGV[7])
end
return {'ok', left}
