-- A stage's started event, written only if the stage is to run: its request is not
-- cancelled (when asked to look) and, given a token, the lock is held under it (the
-- lease was renewed just before, in the same transaction).
-- KEYS: events (of the request), cancel flag (of the request), lock (of the hash, if any)
-- ARGV: events maxlen, stream ttl seconds, look for a cancel ('1' or '0'),
--       token ('' before the lock), then the event's fields and values
-- Returns 1 when the event was written.
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
