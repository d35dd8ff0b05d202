-- POSTs, each with a new Idempotency-Key: every request is a first execution (claim,
-- forward, store). Keys are "<nonce>-<thread>-<counter>"; the harness sets BENCH_NONCE
-- per wrk run, so no key repeats across runs, threads or targets sharing one Redis.
wrk.method = "POST"
wrk.body = '{"order":"bench","items":[{"sku":"A-1","qty":1},{"sku":"B-2","qty":2}],"note":"benchmark"}'
wrk.headers["Content-Type"] = "application/json"

local threads = 0

function setup(thread)
   -- Runs in the main Lua state, once per thread, before the threads start.
   threads = threads + 1
   thread:set("thread_id", threads)
end

local prefix = ""
local counter = 0

function init(args)
   -- Runs in each thread's own Lua state, so `counter` is per thread.
   prefix = (os.getenv("BENCH_NONCE") or tostring(os.time())) .. "-" .. tostring(thread_id) .. "-"
end

function request()
   counter = counter + 1
   local headers = {}
   for name, value in pairs(wrk.headers) do
      headers[name] = value
   end
   headers["Idempotency-Key"] = prefix .. counter
   return wrk.format(nil, nil, headers, nil)
end
