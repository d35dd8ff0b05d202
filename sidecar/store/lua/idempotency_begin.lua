-- Idempotency: look a record up, and claim it for the caller if there is none.
-- KEYS[1]: the record, a hash: s = state (p in progress, c completed, n completed but not
--          replayable), t = owner token, f = request fingerprint, c = status,
--          h = stored headers (JSON), b = body, e = expiry (Unix ms, for the header).
-- ARGV[1]: the caller's owner token. ARGV[2]: its request fingerprint. ARGV[3]: lease (ms).
-- Returns one of:
--   {"claimed"}                                      the caller owns it now (lease set)
--   {"in_progress", same, lease_left_ms}             another owner is running it
--   {"completed", same, status, headers, body, e}    replayable
--   {"not_replayable", same, status, e}              ran, but its response was not kept
-- where `same` is 1 when the fingerprints match, else 0.
local state = redis.call('HGET', KEYS[1], 's')
if not state then
  redis.call('HSET', KEYS[1], 's', 'p', 't', ARGV[1], 'f', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
local same = 0
if redis.call('HGET', KEYS[1], 'f') == ARGV[2] then
  same = 1
end
if state == 'p' then
  return {'in_progress', same, redis.call('PTTL', KEYS[1])}
end
local status = tonumber(redis.call('HGET', KEYS[1], 'c'))
local expires = tonumber(redis.call('HGET', KEYS[1], 'e'))
if state == 'c' then
  return {'completed', same, status, redis.call('HGET', KEYS[1], 'h'),
          redis.call('HGET', KEYS[1], 'b'), expires}
end
return {'not_replayable', same, status, expires}
