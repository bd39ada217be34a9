-- Append a batch of decision lines (JSON) to the dashboard's recent-decisions stream,
-- oldest first, capped at about ARGV[1] lines (MAXLEN ~ trims whole nodes, cheaply).
-- One script call per batch: the worker sends one command, whatever the batch's size.
-- KEYS: the stream; ARGV: the cap, then the lines. Returns how many were appended.
local stream, cap = KEYS[1], ARGV[1]
for i = 2, #ARGV do
  redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'line', ARGV[i])
end
return #ARGV - 1
