-- The checks every money script starts with, prepended to each by ledger/scripts.py (one
-- source per script, so a call is still one EVALSHA). Each check takes the keys its script
-- was given, all under one hash tag, and returns the script's refusal, or nil to go on.

-- Redis's clock, unix ms.
local function clock_ms()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

-- {"deadline_passed"} once Redis's clock is past the caller's deadline (unix ms, ARGV[1] of
-- a hot-path script): the caller has stopped waiting and answered 503, so nothing moves.
local function past_deadline(deadline, now)
  if now > tonumber(deadline) then return {'deadline_passed'} end
  return nil
end

-- {"unknown_payer"} or {"payer_suspended"} unless the payer's account is active.
local function payer_refused(account)
  local status = redis.call('HGET', account, 'status')
  if not status then return {'unknown_payer'} end
  if status ~= 'active' then return {'payer_suspended'} end
  return nil
end

-- {"nonce_reused", what spent it (a receipt or hold id)} if the proof's nonce is spent.
local function nonce_refused(nonce_key)
  local spent = redis.call('GET', nonce_key)
  if spent then return {'nonce_reused', spent} end
  return nil
end

-- {"insufficient_funds", balance} if the payer's balance of `asset` is under `amount`.
local function funds_refused(account, asset, amount)
  local balance = tonumber(redis.call('HGET', account, 'balance:' .. asset) or '0')
  if balance < amount then return {'insufficient_funds', balance} end
  return nil
end

-- A charge of one proof: the payer active, its nonce unused, its balance enough.
local function charge_refused(account, nonce_key, asset, amount)
  return payer_refused(account) or nonce_refused(nonce_key)
    or funds_refused(account, asset, amount)
end

-- A payment seen before: its first outcome is recorded under `outcome` (a hash, same hash
-- tag) with the fingerprint of the request it paid for. nil: a payment not seen. Else
-- {"payment_identifier_conflict", receipt id} for another request; {"nonce_reused", receipt
-- id} past `limit` redeliveries; or {"redelivered", field, value, ...}: the recorded outcome
-- (never charged again).
local function retried(outcome, fingerprint, limit)
  local seen = redis.call('HMGET', outcome, 'fp', 'receipt_id')
  if not seen[1] then return nil end
  if seen[1] ~= fingerprint then return {'payment_identifier_conflict', seen[2]} end
  if redis.call('HINCRBY', outcome, 'redelivered', 1) > tonumber(limit) then
    return {'nonce_reused', seen[2]}
  end
  local fields = redis.call('HGETALL', outcome)
  return {'redelivered', unpack(fields)}
end

-- Keep a payment's response under its `outcome` (for `ttl` ms, as the outcome) so its
-- retry is answered with it (server/replays.py): at most `limit` kept per payer at once
-- (`replays`, a zset of outcome keys by expiry). Over the limit nothing is kept and the
-- retry is redelivered instead. `response`: "" keeps nothing.
local function keep_response(replays, outcome, response, limit, now, ttl)
  if response == '' or ttl <= 0 or tonumber(limit) <= 0 then return end
  redis.call('ZREMRANGEBYSCORE', replays, '-inf', now)
  if redis.call('ZCARD', replays) >= tonumber(limit) then return end
  redis.call('HSET', outcome, 'response', response)
  redis.call('ZADD', replays, now + ttl, outcome)
  if redis.call('PTTL', replays) < ttl then redis.call('PEXPIRE', replays, ttl) end
end
