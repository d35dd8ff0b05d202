-- Compare-and-set one hash field (test script).
-- KEYS[1]: the hash. ARGV[1]: field. ARGV[2]: expected value ('' means "field absent").
-- ARGV[3]: new value.
-- Returns {1, new value} when it swapped, else {0, current value or nil}.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (current or '') ~= ARGV[2] then
  return {0, current}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1, ARGV[3]}
