-- A new task, due for its first poll at once: into its partition's live
-- set and the inbox its owner takes new tasks from; the wake message names
-- the partition, so only its owner looks. Every key shares the partition's
-- hash tag.
-- KEYS: task, partition live, partition inbox, session tasks, session live,
--       session.
-- ARGV: task json, session, backend, id, created ms, event, ttl s,
--       events channel, wake channel, partition.
redis.call('HSET', KEYS[1], 'task', ARGV[1], 'seq', 0, 'session', ARGV[2],
  'backend', ARGV[3], 'track', '{}', 'final', 0)
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('RPUSH', KEYS[3], ARGV[4])
-- The inbox is a hint for a running owner (a new owner reads the live set):
-- bounded, should no worker drain it for a long time.
redis.call('LTRIM', KEYS[3], -100000, -1)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('HSETNX', KEYS[6], 'created', ARGV[5])
for i = 4, 6 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
redis.call('PUBLISH', ARGV[8], ARGV[6])
redis.call('PUBLISH', ARGV[9], ARGV[10])
return 1
