-- Hand the lock of a dead holder to one of its waiters.
-- Runs only when the lease has run out (the key is gone) and requests still wait.
-- KEYS: lock, pending, pending index, answering ; ARGV: new token, lease ms, source hash
-- Returns the pending map (id, json, ...) when the caller now holds the lock.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[3])
  return false
end
-- A holder that died while answering: its successor writes the record and answers.
redis.call('DEL', KEYS[4])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('HGETALL', KEYS[2])
