-- A new task, due for its first poll at once; the wake message names its
-- backend's delay queue, so only that backend's claim loop wakes.
-- KEYS: task, due (its backend's), session tasks, session live, session.
-- ARGV: task json, session, backend, id, created ms, event, ttl s,
--       events channel, wake channel.
redis.call('HSET', KEYS[1], 'task', ARGV[1], 'seq', 0, 'session', ARGV[2],
  'backend', ARGV[3], 'track', '{}', 'final', 0)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSETNX', KEYS[5], 'created', ARGV[5])
for i = 3, 5 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
redis.call('PUBLISH', ARGV[8], ARGV[6])
redis.call('PUBLISH', ARGV[9], KEYS[2])
return 1
