-- Idempotency: give a claim up (the request failed in a way a retry may safely repeat).
-- KEYS[1]: the record. ARGV[1]: owner token.
-- Returns 1 if the caller's in-progress claim was deleted, else 0 (not the owner any more).
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
