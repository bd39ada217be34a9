-- Commit a claimed batch after its manifest reached the anchor sinks: move the settled
-- cursor past it and record its id, once. A worker that lost its claim (another finished
-- the same batch) gets "stale" and does nothing: no receipt is ever in two batches.
-- KEYS: settlement hash, the payer's batch list (both under the payer's hash tag)
-- ARGV: first, last (the claimed stream ids), batch id
-- Returns {"ok", seq} or {"stale"}.
local state, batches = KEYS[1], KEYS[2]
local s = redis.call('HMGET', state, 'claim_first', 'claim_last', 'seq')
if s[1] ~= ARGV[1] or s[2] ~= ARGV[2] then return {'stale'} end
local seq = tonumber(s[3] or '0') + 1
redis.call('HSET', state, 'settled', ARGV[2], 'seq', seq, 'last_batch', ARGV[3])
redis.call('HDEL', state, 'claim_first', 'claim_last', 'claim_owner', 'claim_until')
redis.call('RPUSH', batches, ARGV[3])
return {'ok', seq}
