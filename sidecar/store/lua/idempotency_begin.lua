-- Idempotency: look a record up, and claim it for the caller if there is none.
-- KEYS[1]: the record, a hash: s = state (p in progress, c completed, n completed but not
--          replayable), t = claim token, f = request fingerprint, v = record layout version,
--          c = status, h = stored headers (JSON), b = body, e = expiry (Unix ms, store clock).
-- ARGV[1]: the caller's owner id (random hex). ARGV[2]: its request fingerprint.
-- ARGV[3]: lease (ms). ARGV[4]: the record layout version the caller reads and writes.
-- The claim token is the store's clock in microseconds (16 digits), '-', the owner id: the
-- claims of one key succeed each other in time, so their tokens sort in claim order, which
-- lets an app fence on it. A record without v predates versioning and has layout 1.
-- Returns one of:
--   {"claimed", token}                               the caller owns it now (lease set)
--   {"in_progress", same, lease_left_ms}             another owner is running it
--   {"completed", same, status, headers, body, e}    replayable
--   {"not_replayable", same, status, e}              ran, but its response was not kept
--   {"foreign", version}                             a layout this caller cannot read
--   {"malformed", state}                             a state no layout has
-- where `same` is 1 when the fingerprints match, else 0.
local state = redis.call('HGET', KEYS[1], 's')
if not state then
  local now = redis.call('TIME')
  local token = string.format('%010d%06d-%s', now[1], now[2], ARGV[1])
  redis.call('HSET', KEYS[1], 's', 'p', 't', token, 'f', ARGV[2], 'v', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed', token}
end
local version = redis.call('HGET', KEYS[1], 'v') or '1'
if version ~= ARGV[4] then
  return {'foreign', version}
end
local same = 0
if redis.call('HGET', KEYS[1], 'f') == ARGV[2] then
  same = 1
end
if state == 'p' then
  return {'in_progress', same, redis.call('PTTL', KEYS[1])}
end
if state ~= 'c' and state ~= 'n' then
  return {'malformed', state}
end
-- A field that is not a plain integer comes back as false (not nil, which would cut the
-- reply short), so the caller sees a malformed record rather than a shorter one.
local function integer(field)
  local value = redis.call('HGET', KEYS[1], field)
  if value and string.match(value, '^%-?%d+$') then
    return tonumber(value)
  end
  return false
end
local status = integer('c')
local expires = integer('e')
if state == 'c' then
  return {'completed', same, status, redis.call('HGET', KEYS[1], 'h'),
          redis.call('HGET', KEYS[1], 'b'), expires}
end
return {'not_replayable', same, status, expires}
