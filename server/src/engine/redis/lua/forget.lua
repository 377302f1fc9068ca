-- `forget`: drops a final task of a session. KEYS: task, session tasks.
-- ARGV: session, id, event, events channel. Returns 1 if it did.
local v = redis.call('HMGET', KEYS[1], 'session', 'final')
if not v[1] then redis.call('ZREM', KEYS[2], ARGV[2]) return 0 end
if v[1] ~= ARGV[1] or v[2] ~= '1' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
