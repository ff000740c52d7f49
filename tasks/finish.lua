-- Write the record of a hash's build, only for the token that holds the lock (a holder
-- that froze past its lease cannot overwrite its successor), and keep the lock while
-- that chain answers the pending requests: release.lua ends it. A chain cut off in
-- between (its worker killed, Redis gone) is then repeated or taken over, never lost.
-- KEYS: lock, pending, record, history, answering, builds
-- ARGV: token, record json, source hash, finished-at score, history size, attempt,
--       lease ms, builds the record counts, record key prefix
-- The history index keeps the newest `history size` hashes; the records of hashes it
-- drops go with them, so records stay bounded too.
-- Returns false when the token no longer holds the lock or another copy of the chain
-- (a duplicate delivery, same token) answers; {'recount'} when a build was noted since
-- the caller counted them; else {stored record json, pending id, request json, ...}.
-- The first record written stands: the same attempt repeating (its reply was lost)
-- gets that record back rather than writing another.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local by = redis.call('GET', KEYS[5])
if by and by ~= ARGV[6] then
  return false
end
if not by then
  if redis.call('HLEN', KEYS[6]) ~= tonumber(ARGV[8]) then
    return {'recount'}
  end
  redis.call('SET', KEYS[3], ARGV[2])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
  local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[5])
  if excess > 0 then
    for _, dropped in ipairs(redis.call('ZRANGE', KEYS[4], 0, excess - 1)) do
      if dropped ~= ARGV[3] then
        redis.call('DEL', ARGV[9] .. dropped)
      end
    end
    redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1)
  end
end
redis.call('SET', KEYS[5], ARGV[6], 'PX', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local reply = redis.call('HGETALL', KEYS[2])
table.insert(reply, 1, redis.call('GET', KEYS[3]))
return reply
