-- Compare-and-set of a task on its seq; publishes a change and moves the
-- task's queue entry. KEYS: task, due (its backend's), session live.
-- ARGV: expected seq, task json ('' = unchanged), track json,
--       next ('keep' | 'final' | due ms), retention s, id, event, final flag,
--       events channel.
-- Returns 1 saved, 0 conflict, -1 gone.
local cur = redis.call('HGET', KEYS[1], 'seq')
if not cur then redis.call('ZREM', KEYS[2], ARGV[6]) return -1 end
if cur ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'task', ARGV[2], 'seq', tonumber(ARGV[1]) + 1, 'final', ARGV[8])
  redis.call('PUBLISH', ARGV[9], ARGV[7])
end
redis.call('HSET', KEYS[1], 'track', ARGV[3])
if ARGV[4] == 'final' then
  redis.call('ZREM', KEYS[2], ARGV[6])
  redis.call('SREM', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
elseif ARGV[4] ~= 'keep' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
end
return 1
