-- A worker's lease on a partition. KEYS: the partition's owner key.
-- ARGV: worker id, lease ms, 'renew' | 'release'.
-- Renews (or drops) the lease only while the worker still holds it.
-- Returns 1 if it did, 0 if the lease is not (or no longer) the worker's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
