-- Moves a claimed entry to the delay queue of the task's own backend (a
-- task queued under another backend's key: the backends were reordered or
-- renamed). KEYS: from, to. ARGV: id, lease score held, due ms, wake channel.
-- Only while the entry still holds the caller's lease. Returns 1 if moved.
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not cur or tonumber(cur) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[4], KEYS[2])
return 1
