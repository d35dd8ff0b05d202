-- Appended to every request script by the harness: one machine-readable line with what
-- wrk measured (latency in microseconds), so nothing depends on wrk's human-readable units.
-- The headers every benchmark request carries: identity for the quota and idempotency
-- policies (records are scoped by org and user). Direct and nginx targets get them too,
-- so every target parses the same request.
wrk.headers["X-Org-Id"] = "bench-org"
wrk.headers["X-User-Id"] = "bench-user"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end
