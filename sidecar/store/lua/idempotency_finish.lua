-- Idempotency: record the outcome of the caller's execution (compare-and-set on the token).
-- KEYS[1]: the record. ARGV[1]: claim token. ARGV[2]: state, c (replayable) or n (not).
-- ARGV[3]: status. ARGV[4]: headers (JSON). ARGV[5]: body. ARGV[6]: time to keep it (ms).
-- ARGV[7]: request fingerprint. ARGV[8]: record layout version.
-- The expiry shown to clients (e, Unix ms) is the store's clock plus ARGV[6], so it agrees
-- with when the store really drops the record, whatever the callers' clocks say.
-- Returns 1 if stored over the caller's claim (or already stored by this caller: a retried
-- write is harmless); 2 if the claim had lapsed and nobody else had claimed the key (stored,
-- so retries replay instead of running again); 0 if another owner holds the key now
-- (nothing written).
local state = redis.call('HGET', KEYS[1], 's')
local result = 1
if not state then
  result = 2
elseif redis.call('HGET', KEYS[1], 't') ~= ARGV[1] then
  return 0
elseif state ~= 'p' then
  return 1
end
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 's', ARGV[2], 'c', ARGV[3], 'h', ARGV[4], 'b', ARGV[5],
           'e', string.format('%d', expires), 'f', ARGV[7], 't', ARGV[1], 'v', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return result
