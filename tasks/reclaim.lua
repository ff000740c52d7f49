-- Claim a request whose fetch/hash stage stopped renewing its lease (its worker died).
-- KEYS: inflight hash, the request's lease ; ARGV: request id, lease ms
-- Returns the request's state json when the caller now owns its restart, else false.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local state = redis.call('HGET', KEYS[1], ARGV[1])
if not state then
  return false
end
redis.call('SET', KEYS[2], 'reclaimed', 'PX', ARGV[2])
return state
