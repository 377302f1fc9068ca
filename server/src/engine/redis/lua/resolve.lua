-- Whether a session exists; refreshes the lifetime of its keys.
-- KEYS: session, its tasks, its live set. ARGV: ttl s.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return 1
