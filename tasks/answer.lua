-- Claim the one answer of a request for an attempt (one run of a chain's record stage),
-- and publish the request's "done" event with it, so both happen once; with a third key,
-- also store the answer there as Celery's result backend would (SET with a lifetime, then
-- PUBLISH to the key's channel, where a waiting .get() listens), in the same round trip.
-- KEYS: answered, events[, result] ; ARGV: attempt, ttl s, emit done (0|1), status, events
-- maxlen, events ttl s[, result value, result ttl s]
-- Returns 1 when the attempt answers first, 2 when the same attempt answered already (it
-- repeats after a lost reply: the answer is stored again, the event is not sent again),
-- 0 when another attempt answered (nothing is stored).
local function store()
  if KEYS[3] then
    redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])
    redis.call('PUBLISH', KEYS[3], ARGV[7])
  end
end
-- The claim is written last: should a command before it fail (the script stops there, its
-- earlier writes kept), the request is not marked answered, and release.lua, given the
-- answered keys, does not release the lock behind a claim that did not finish.
local by = redis.call('GET', KEYS[1])
if not by then
  if ARGV[3] == '1' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'kind', 'done', 'status', ARGV[4])
    redis.call('EXPIRE', KEYS[2], ARGV[6])
  end
  store()
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if by == ARGV[1] then
  store()
  return 2
end
return 0
