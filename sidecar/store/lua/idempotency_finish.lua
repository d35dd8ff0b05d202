-- Idempotency: record the outcome of the caller's execution (compare-and-set on the token).
-- KEYS[1]: the record. ARGV[1]: owner token. ARGV[2]: state, c (replayable) or n (not).
-- ARGV[3]: status. ARGV[4]: headers (JSON). ARGV[5]: body. ARGV[6]: expiry (Unix ms, shown
-- to clients). ARGV[7]: time to keep it (ms). ARGV[8]: request fingerprint.
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
redis.call('HSET', KEYS[1], 's', ARGV[2], 'c', ARGV[3], 'h', ARGV[4], 'b', ARGV[5], 'e', ARGV[6],
           'f', ARGV[8], 't', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return result
