-- Renews a worker's leases on the polls it is running. KEYS: due.
-- ARGV: triples id, lease score the worker holds, new lease score.
-- A lease is renewed only where the entry still has the worker's score: a
-- poll already saved (its real next due time is there) or a task gone is
-- left alone. Returns one 1 (renewed) or 0 per id.
local out = {}
for i = 1, #ARGV, 3 do
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if cur and tonumber(cur) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
