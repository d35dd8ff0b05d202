-- Does KEYS[1] exist? (test script) Returns a bare Lua boolean: a client speaking RESP2
-- gets 1 for true and nil for false; RESP3 would turn them into booleans.
return redis.call('EXISTS', KEYS[1]) == 1
