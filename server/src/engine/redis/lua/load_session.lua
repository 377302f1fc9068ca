-- A session's tasks: [task json, backend id]* oldest first, dropping the
-- ids whose task has expired. KEYS: session tasks. ARGV: task key prefix.
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'task', 'backend')
  if v[1] then
    out[#out + 1] = v[1]
    out[#out + 1] = v[2]
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
