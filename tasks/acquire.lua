-- Take the build lock for a source hash, or join its waiters.
-- Every request registers in the pending map so whoever finishes (or takes
-- over from a dead holder) can hand each one the record. From then on the pending map
-- keeps the request restartable, so its in-flight entry and lease (tasks/inflight.py),
-- which did until now, go in the same step.
-- KEYS: lock, pending, pending index, in-flight map, in-flight lease
-- ARGV: token, lease ms, request id, request json, source hash
-- Returns 1 when the caller holds the lock, 0 when it waits.
local holder = redis.call('GET', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('DEL', KEYS[5])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
