-- Release a payer's holds past their lifetime (worker 0's sweeper, for every payer).
-- KEYS: account hash, holds hash, hold expiries zset (the payer's hash tag)
-- ARGV: nonce key prefix, at most this many
-- Returns how many holds were released.
return sweep_holds(KEYS[1], KEYS[2], KEYS[3], ARGV[1], clock_ms(), tonumber(ARGV[2]))
