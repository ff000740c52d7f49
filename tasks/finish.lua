-- Write the record and release the lock, only for the token that holds it,
-- so a holder that froze past its lease cannot overwrite its successor.
-- KEYS: lock, pending, pending index, record, history
-- ARGV: token, record json, source hash, finished-at score, history size
-- Returns false when the token no longer holds the lock, else
-- {'ok', pending id, pending request json, ...}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -tonumber(ARGV[5]) - 1)
local waiting = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
table.insert(waiting, 1, 'ok')
return waiting
