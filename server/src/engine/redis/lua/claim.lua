-- Claims due polls. KEYS: due. ARGV: now, max, lease until, task key prefix.
-- Moves each due entry to the end of its lease (one ZADD for them all), so
-- no other worker takes it; the worker's save sets the real next due time,
-- and a dead worker's claims come due again. Returns, per claim, [id, due,
-- task, seq, session, backend, track] (the task's fields '' when it is
-- gone), then the earliest due time left ('' if none): one round trip
-- claims and reads.
local got = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
if #got > 0 then
  local lease = {}
  for i = 1, #got, 2 do
    lease[#lease + 1] = ARGV[3]
    lease[#lease + 1] = got[i]
  end
  redis.call('ZADD', KEYS[1], unpack(lease))
end
for i = 1, #got, 2 do
  local v = redis.call('HMGET', ARGV[4] .. got[i], 'task', 'seq', 'session', 'backend', 'track')
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  for j = 1, 5 do out[#out + 1] = v[j] or '' end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
out[#out + 1] = first[2] or ''
return out
