-- Count events in a fixed window (test script).
-- KEYS[1]: the counter. ARGV[1]: amount to add (integer). ARGV[2]: window length (ms).
-- Returns the count after adding (integer). The window starts at the first increment:
-- later increments keep the counter's expiry.
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return count
