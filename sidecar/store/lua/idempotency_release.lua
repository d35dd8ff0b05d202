-- Idempotency: give a claim up (the request failed in a way a retry may safely repeat).
-- KEYS[1]: the record. ARGV[1]: the claim token, or only its owner id (its tail after '-'):
-- a caller whose claim landed but whose reply was lost knows no more than its owner id.
-- Returns 1 if the caller's in-progress claim was deleted, else 0 (not the owner any more).
local token = redis.call('HGET', KEYS[1], 't')
if redis.call('HGET', KEYS[1], 's') == 'p' and token
    and (token == ARGV[1] or string.sub(token, -string.len(ARGV[1]) - 1) == '-' .. ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
