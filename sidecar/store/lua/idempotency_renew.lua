-- Idempotency: extend the caller's in-progress claim while its upstream call runs.
-- KEYS[1]: the record. ARGV[1]: claim token. ARGV[2]: new lease (ms).
-- Returns 1 if renewed, 0 if the caller no longer owns an in-progress claim.
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
