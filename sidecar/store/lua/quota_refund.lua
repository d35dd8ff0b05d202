-- Quotas: give back what admitted requests were charged (they turned out not to count).
-- KEYS[1..n]: counters. ARGV[1]: n. Then 2 ARGV per counter: kind ("rate" | "quota"),
-- amount (the cost charged, in units).
-- A rate bucket's level and a quota's count never go below zero; a rate bucket keeps its
-- expiry (it drains no slower for being given units back).
-- Returns how many counters changed.
local changed = 0
for i = 1, tonumber(ARGV[1]) do
  local key, kind, amount = KEYS[i], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local stored = redis.call('GET', key)
  if stored then
    changed = changed + 1
    if kind == 'rate' then
      local l, at = string.match(stored, '^(%d+):(%d+)$')
      if not l then
        return redis.error_reply('ERR quota counter ' .. key .. ' is not a bucket level')
      end
      local level = tonumber(l) - amount * 1000000
      local ttl = redis.call('PTTL', key)
      if level <= 0 or ttl <= 0 then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%d:%s', level, at), 'PX', ttl)
      end
    else
      local left = redis.call('DECRBY', key, amount)
      if left < 0 then redis.call('INCRBY', key, -left) end
    end
  end
end
return changed
