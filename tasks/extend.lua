-- Renew the lease, only for the token that holds it.
-- KEYS: lock, pending, answered (of the request), pending index
-- ARGV: token, lease ms, request id, request json, source hash
-- A stage redelivered after its lease ran out may take the lock back, but only
-- while its request is still pending (nobody finished it) and nobody else holds it.
-- A stage whose request is neither pending nor answered, with the lock free, lost its
-- build's state with a crashed Redis's last writes: it writes it back (given the
-- request's json), as nobody else knows the request any more.
-- Returns 1 when the caller holds the lock afterwards.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder or ARGV[3] == '' then
  return 0
end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
  if ARGV[4] == '' or redis.call('EXISTS', KEYS[3]) == 1 then
    return 0
  end
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  redis.call('SADD', KEYS[4], ARGV[5])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
