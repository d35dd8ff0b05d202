-- Busy-loop for ARGV[1] milliseconds of server time, then return 1 (test script).
-- Used to outlast the client's timeout; keep it well under busy-reply-threshold (5 s),
-- or every other client gets BUSY until it ends.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local deadline = now_us() + tonumber(ARGV[1]) * 1000
repeat until now_us() >= deadline
return 1
