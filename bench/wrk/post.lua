-- POST of a fixed ~100-byte JSON body without an Idempotency-Key: the pass-through baseline
-- for the idempotency targets (same request shape, nothing for the policy to do).
wrk.method = "POST"
wrk.body = '{"order":"bench","items":[{"sku":"A-1","qty":1},{"sku":"B-2","qty":2}],"note":"benchmark"}'
wrk.headers["Content-Type"] = "application/json"
