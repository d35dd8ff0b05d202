-- Quotas: check every limit of one request and charge them all, or none.
-- KEYS[1]: the organisation's overrides hash (limit name -> limit, set by the admin API).
-- KEYS[2..n+1]: each limit's counter: a rate's bucket level "MICROUNITS:AT_US" (the units
-- charged and not yet drained, in millionths, as of Unix µs AT_US), or a period's count.
-- ARGV[1]: "charge", or "peek" (evaluate, write nothing). ARGV[2]: n.
-- Then 7 ARGV per limit: kind ("rate" | "quota"), limit, override field ("" for none),
-- window (rate: µs; quota: the period's end, Unix ms), burst (rate: capacity, 0 = the
-- limit), cost, flag ("e" enforced | "s" shadow: never refuses the request).
-- The clock is the store's (TIME), so replicas' clocks never matter for rates.
-- Returns {allowed, now_ms, then per limit: ok, effective limit, remaining, reset_ms,
-- retry_after_ms}; values of a charged request are those after charging.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)
local charge = ARGV[1] == 'charge'
local n = tonumber(ARGV[2])
local allowed = true
local results = {}
local writes = {}

local function integer(value)
  if value and string.match(value, '^%d+$') then
    return tonumber(value)
  end
  return nil
end

for i = 1, n do
  local base = 3 + (i - 1) * 7
  local kind, limit = ARGV[base], tonumber(ARGV[base + 1])
  local field, window = ARGV[base + 2], tonumber(ARGV[base + 3])
  local burst, cost, flag = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]), ARGV[base + 6]
  local key = KEYS[i + 1]
  if field ~= '' then
    local override = integer(redis.call('HGET', KEYS[1], field))
    if override then limit = override end
  end
  local stored = redis.call('GET', key)
  local ok, remaining, reset_ms, retry_ms, write
  if kind == 'rate' then
    -- GCRA kept as a leaky bucket's level in units (not as a theoretical arrival time), so
    -- that a limit changed by an override rescales what was used instead of reinterpreting it.
    local level, at = 0, now_us
    if stored then
      local l, a = string.match(stored, '^(%d+):(%d+)$')
      if not l then
        return redis.error_reply('ERR quota counter ' .. key .. ' is not a bucket level')
      end
      level, at = tonumber(l), tonumber(a)
    end
    local capacity = burst
    if capacity == 0 then capacity = limit end
    if limit <= 0 then
      ok = cost == 0
      remaining, reset_ms, retry_ms = 0, math.ceil(window / 1000), math.ceil(window / 1000)
      if ok then retry_ms = 0 end
    else
      -- µunits drained per µs: the limit per window.
      local drain = limit * 1000000 / window
      local now_level = math.max(0, level - math.max(0, now_us - at) * drain)
      local new_level = now_level + cost * 1000000
      -- One µunit of slack: levels are stored rounded up.
      ok = cost == 0 or new_level <= capacity * 1000000 + 1
      if ok then
        remaining = math.floor((capacity * 1000000 - new_level) / 1000000)
        reset_ms = math.ceil(new_level / drain / 1000)
        retry_ms = 0
        if cost > 0 then write = {'rate', string.format('%d:%d', math.ceil(new_level), now_us), reset_ms + 1000} end
      else
        remaining = math.floor((capacity * 1000000 - now_level) / 1000000)
        reset_ms = math.ceil(now_level / drain / 1000)
        retry_ms = math.max(1, math.ceil((new_level - capacity * 1000000) / drain / 1000))
      end
      remaining = math.max(0, math.min(capacity, remaining))
    end
  else
    if stored and not string.match(stored, '^%-?%d+$') then
      return redis.error_reply('ERR quota counter ' .. key .. ' is not an integer')
    end
    local used = tonumber(stored or '0')
    ok = used + cost <= limit
    reset_ms = math.max(0, window - now_ms)
    if ok then
      remaining = math.max(0, limit - used - cost)
      retry_ms = 0
      if cost > 0 then write = {'quota', cost, (window - now_ms) + 86400000} end
    else
      remaining = math.max(0, limit - used)
      retry_ms = math.max(1, reset_ms)
    end
  end
  if not ok and flag == 'e' then allowed = false end
  if ok and write then writes[#writes + 1] = {key, write} end
  local ok_flag = 0
  if ok then ok_flag = 1 end
  results[#results + 1] = {ok_flag, limit, remaining, reset_ms, retry_ms}
end

if charge and allowed then
  for _, item in ipairs(writes) do
    local key, write = item[1], item[2]
    if write[1] == 'rate' then
      redis.call('SET', key, write[2], 'PX', write[3])
    else
      redis.call('INCRBY', key, write[2])
      redis.call('PEXPIRE', key, math.max(1, write[3]))
    end
  end
end

local reply = {allowed and 1 or 0, now_ms}
for _, r in ipairs(results) do
  for _, v in ipairs(r) do reply[#reply + 1] = v end
end
return reply
