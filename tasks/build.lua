-- Note a build of the hash by one attempt (one run of a build stage), so the record
-- counts the builds made for its requests.
-- KEYS: lock, builds, pending, counted builds ; ARGV: token, attempt, mode, counted ttl ms
-- mode 'start', before building: only while the token holds the lock, and only if no
--   other attempt under the same token noted one (a stage delivered twice); returns the
--   number of builds noted, or 0: do not build. At most one build per lease epoch.
-- mode 'end', after building: notes it again, as the start note may have been among
--   the last writes a crashed Redis lost. Returns 1, or 0 when the note came too late
--   for the record (its requests were answered, the notes counted without this one).
if ARGV[3] == 'start' then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
  end
  local notes = redis.call('HGETALL', KEYS[2])
  for i = 1, #notes, 2 do
    if notes[i + 1] == ARGV[1] and notes[i] ~= ARGV[2] then
      return 0
    end
  end
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
  return redis.call('HLEN', KEYS[2])
end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 or redis.call('HEXISTS', KEYS[4], ARGV[2]) == 1 then
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
return 0
