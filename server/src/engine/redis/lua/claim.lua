-- Claims due polls. KEYS: due. ARGV: now, max, lease until.
-- Moves each due entry to the end of its lease (one ZADD for them all), so
-- no other worker takes it; the worker's save sets the real next due time,
-- and a dead worker's claims come due again. Returns [id, due]* then the
-- earliest due time left ('' if none). The worker reads the claimed tasks
-- with plain HMGETs pipelined right after: a script that handed their
-- JSON through Lua cost Redis more than the extra round trip per claim.
local got = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
if #got > 0 then
  local lease = {}
  for i = 1, #got, 2 do
    lease[#lease + 1] = ARGV[3]
    lease[#lease + 1] = got[i]
  end
  redis.call('ZADD', KEYS[1], unpack(lease))
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
got[#got + 1] = first[2] or ''
return got
