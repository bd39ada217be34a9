-- Claim the payer's next settlement batch: the receipts after the settled cursor, at most
-- ARGV[4] of them. A claim is fixed once made: retried (after a crash, or by another worker
-- once the lease has run out) it returns the very same range, so the batch built from it
-- is the same batch, byte for byte. Only a commit moves the cursor past it. A claim holds
-- the receipts of one payee (one signing key) only.
-- Retention first: settled receipts older than ARGV[6] ms leave the stream (XTRIM MINID,
-- never past the settled cursor: an unsettled receipt always stays); the settlement hash's
-- `trimmed` records the first id kept, so evidence knows which batches are gone.
-- KEYS: settlement hash, receipts stream (both under the payer's hash tag)
-- ARGV: worker id, now (unix ms), lease (ms), max count, max age (ms; 0 = flush now),
--       retention (ms; 0 = keep every receipt)
-- Returns {"claimed", previous, first, last, seq, entries} or {"busy", owner}
--      or {"wait", oldest ms} or {"empty"}.
local state, stream = KEYS[1], KEYS[2]
local owner, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_count, max_age = tonumber(ARGV[4]), tonumber(ARGV[5])
local retention = tonumber(ARGV[6] or '0')

local s = redis.call('HMGET', state, 'settled', 'seq', 'claim_first', 'claim_last',
  'claim_owner', 'claim_until')
local settled, seq = s[1] or '0-0', tonumber(s[2] or '0')

if retention > 0 and settled ~= '0-0' then
  local settled_ms, settled_seq = string.match(settled, '^(%d+)-(%d+)$')
  local mark = now - retention
  local keep_from  -- the first id kept: the retention mark, or just past the cursor
  if mark > tonumber(settled_ms) then
    keep_from = settled_ms .. '-' .. string.format('%d', tonumber(settled_seq) + 1)
  else
    keep_from = string.format('%d', mark) .. '-0'
  end
  if redis.call('XTRIM', stream, 'MINID', keep_from) > 0 then
    redis.call('HSET', state, 'trimmed', keep_from)
  end
end

if s[3] then
  if s[5] ~= owner and tonumber(s[6]) > now then return {'busy', s[5]} end
  -- The holder crashed or stalled past its lease: take the same range over.
  redis.call('HSET', state, 'claim_owner', owner, 'claim_until', string.format('%d', now + lease))
  local entries = redis.call('XRANGE', stream, s[3], s[4])
  return {'claimed', settled, s[3], s[4], seq + 1, entries}
end

local entries = redis.call('XRANGE', stream, '(' .. settled, '+', 'COUNT', max_count)
if #entries == 0 then return {'empty'} end
if #entries < max_count then
  -- A partial batch waits until its oldest receipt is max_age old (stream ids are ms).
  local oldest = tonumber(string.match(entries[1][1], '^(%d+)'))
  if now - oldest < max_age then return {'wait', string.format('%d', oldest)} end
end
-- One batch, one signing key: the claim ends where the payee (the id of the key that
-- signed the receipts) changes, as it does once per payer after a key rotation.
local function payee(entry)
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'payee' then return f[i + 1] end
  end
  return ''
end
local kid = payee(entries[1])
for i = 2, #entries do
  if payee(entries[i]) ~= kid then
    local same = {}
    for j = 1, i - 1 do same[j] = entries[j] end
    entries = same
    break
  end
end
local first, last = entries[1][1], entries[#entries][1]
redis.call('HSET', state, 'claim_first', first, 'claim_last', last, 'claim_owner', owner,
  'claim_until', string.format('%d', now + lease))
return {'claimed', settled, first, last, seq + 1, entries}
