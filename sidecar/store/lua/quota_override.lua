-- Quotas: an organisation's overrides (the admin API).
-- KEYS[1]: the overrides hash. ARGV[1]: "set" (ARGV[2] limit name, ARGV[3] limit) -> 1,
-- "delete" (ARGV[2]) -> 1 if there was one, else 0, "get" -> {name, limit, ...} by name.
if ARGV[1] == 'set' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  return 1
end
if ARGV[1] == 'delete' then
  return redis.call('HDEL', KEYS[1], ARGV[2])
end
local flat = redis.call('HGETALL', KEYS[1])
local names = {}
local values = {}
for i = 1, #flat, 2 do
  names[#names + 1] = flat[i]
  values[flat[i]] = flat[i + 1]
end
table.sort(names)
local reply = {}
for _, name in ipairs(names) do
  reply[#reply + 1] = name
  reply[#reply + 1] = values[name]
end
return reply
