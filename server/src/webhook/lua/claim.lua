-- Claims due deliveries. KEYS: pending, due. ARGV: now, max, lease until.
-- Each claimed entry moves to the end of its lease, so no other process
-- sends it meanwhile; the claimant's retry or done sets what follows, and
-- a dead claimant's deliveries come due again when the lease ends.
-- Returns the claimed deliveries' JSON, then the earliest due time left
-- ('' if none), then the number of pending deliveries.
local got = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(got) do
  local d = redis.call('HGET', KEYS[1], id)
  if d then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    out[#out + 1] = d
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
out[#out + 1] = first[2] or ''
out[#out + 1] = tostring(redis.call('HLEN', KEYS[1]))
return out
