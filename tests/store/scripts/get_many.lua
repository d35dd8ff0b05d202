-- GET several string keys at once (test script).
-- KEYS: the keys. Returns one entry per key: its value (bulk string) or nil when missing.
-- GET answers false for a missing key; false, unlike nil, survives in a Lua table and
-- reaches the client as a nil reply, so the holes stay in place.
local values = {}
for i, key in ipairs(KEYS) do
  values[i] = redis.call('GET', key)
end
return values
