-- One check against a rate limit (GCRA, a token bucket in one number): up to `burst`
-- checks at once, then `rate` per second. No money moves here; the debit comes after.
-- KEYS: the bucket; optionally the proof's nonce key (same payer hash tag): a replayed
--       proof takes no token, so replaying a captured proof cannot starve its payer
-- ARGV: rate (checks per second, >= 1), burst (>= 1)
-- Returns {"ok"} or {"rate_limited", ms until the next check is allowed}.
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return {'ok'} end
-- The server's clock, so every sidecar replica shares one timeline (no clock skew).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = 1000000 / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + interval - interval * tonumber(ARGV[2]) - now
if wait > 0 then return {'rate_limited', math.ceil(wait / 1000)} end
-- The key expires once the bucket is full again: idle payers and addresses cost nothing.
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {'ok'}
