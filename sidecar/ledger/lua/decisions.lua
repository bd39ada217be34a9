-- Append a batch of decision lines (JSON) to the dashboard's recent-decisions stream,
-- oldest first, capped at about ARGV[1] lines (MAXLEN ~ trims whole nodes, cheaply) and at
-- about ARGV[2] bytes of memory: when MEMORY USAGE (every node counted) says the stream
-- is over, the oldest lines go, in proportion. Lines are bounded in bytes by the sidecar,
-- so a flood of long requests cannot make the stream outgrow its memory.
-- One script call per batch: the worker sends one command, whatever the batch's size.
-- KEYS: the stream; ARGV: the line cap, the byte cap, then the lines.
-- Returns how many were appended.
local stream, cap, max_bytes = KEYS[1], ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'line', ARGV[i])
end
local used = redis.call('MEMORY', 'USAGE', stream, 'SAMPLES', '0')
if used and used > max_bytes then
  local keep = math.floor(redis.call('XLEN', stream) * max_bytes / used)
  redis.call('XTRIM', stream, 'MAXLEN', string.format('%d', keep))
end
return #ARGV - 2
