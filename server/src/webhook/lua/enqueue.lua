-- Queues a task's webhook delivery, once. KEYS: hooks, pending, due.
-- ARGV: task id, delivery id, delivery JSON, due ms, max queue.
-- Returns 1 queued, 0 no registration (another process took it), -1 full
-- (the registration is dropped all the same: the delivery is refused).
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[5]) then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
