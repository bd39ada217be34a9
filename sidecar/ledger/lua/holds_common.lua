-- Shared by the hold scripts (prepended to each by ledger/scripts.py, after money.lua):
-- release a hold and sweep a payer's expired ones. Every key is under the payer's hash
-- tag: the nonce keys a sweep frees are named from `nonce_prefix` (keyspace.nonce(payer,
-- "")), in the same slot.
-- A hold is a field of the payer's holds hash (JSON: asset, held, nonce, record) and a
-- member of its expiry sorted set (score: expiry, unix ms by Redis's clock).

-- Give the whole hold back and free its nonce (if it still names this hold); nil if the
-- hold is gone (captured, released or swept already).
local function release_hold(account, holds, expiries, nonce_prefix, id)
  redis.call('ZREM', expiries, id)
  local raw = redis.call('HGET', holds, id)
  if not raw then return nil end
  local hold = cjson.decode(raw)
  redis.call('HDEL', holds, id)
  redis.call('HINCRBY', account, 'balance:' .. hold.asset, hold.held)
  redis.call('HINCRBY', account, 'held:' .. hold.asset, '-' .. hold.held)
  local nonce_key = nonce_prefix .. hold.nonce
  if redis.call('GET', nonce_key) == id then redis.call('DEL', nonce_key) end
  return hold
end

-- Release up to `limit` holds whose lifetime has passed; how many.
local function sweep_holds(account, holds, expiries, nonce_prefix, now, limit)
  local expired = redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    release_hold(account, holds, expiries, nonce_prefix, id)
  end
  return #expired
end
