-- Quotas: give back what admitted requests were charged (they turned out not to count).
-- KEYS[1..n]: counters. ARGV[1]: n. Then 2 ARGV per counter: kind ("rate" | "quota"),
-- amount (rate: µs to take off the GCRA time; quota: the cost).
-- A rate counter never goes back before now; a quota counter never below zero.
-- Returns how many counters changed.
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local changed = 0
for i = 1, tonumber(ARGV[1]) do
  local key, kind, amount = KEYS[i], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local stored = redis.call('GET', key)
  if stored then
    changed = changed + 1
    if kind == 'rate' then
      local new = tonumber(stored) - amount
      if new <= now_us then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%d', math.floor(new)), 'PX',
                   math.ceil((new - now_us) / 1000) + 1000)
      end
    else
      local left = redis.call('DECRBY', key, amount)
      if left < 0 then redis.call('INCRBY', key, -left) end
    end
  end
end
return changed
