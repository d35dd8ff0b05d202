-- The same POST with the same Idempotency-Key every time: the first request executes,
-- every later one is a replay served from the store without touching the backend.
wrk.method = "POST"
wrk.body = '{"order":"bench","items":[{"sku":"A-1","qty":1},{"sku":"B-2","qty":2}],"note":"benchmark"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "bench-replay-key-1"
