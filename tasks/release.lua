-- End a build whose record is written: drop the requests now answered from the pending
-- map and release the lock, only for the token that holds it. Requests that joined after
-- the record was written stay pending; the watchdog restarts the hash for them.
-- The build notes move to the "counted" key, where a build that ends late (its start
-- note lost with a crashed Redis's last writes) can tell it was not counted.
-- KEYS: lock, pending, pending index, answering, builds, counted builds[, answered key of
--       each answered request]
-- ARGV: token, source hash, counted-builds ttl ms, answered request id, ...
-- Returns 1 when released, 0 when the token no longer held the lock, -1 (releasing
-- nothing) when an answered key given is not set: sent in one round trip behind the
-- claims, a claim that did not run (its script unknown to a Redis restarted since) or did
-- not finish (answer.lua writes the claim last) must not be overtaken by the release, which
-- would leave its request unanswered and not pending.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 7, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    return -1
  end
end
for i = 4, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[6])
  redis.call('PEXPIRE', KEYS[6], ARGV[3])
end
redis.call('DEL', KEYS[1], KEYS[4])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
end
return 1
