-- Renew the lease, only for the token that holds it.
-- KEYS: lock, pending ; ARGV: token, lease ms, request id
-- A stage redelivered after its lease ran out may take the lock back, but only
-- while its request is still pending (nobody finished it) and nobody else holds it.
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
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
