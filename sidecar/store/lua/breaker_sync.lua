-- One replica's sync with a shared circuit breaker (sidecar/policies/breaker/sync.py has
-- the Python twin, line for line): add the replica's counts to the shared window, decide
-- the transitions only the shared state can, grant half-open probe permits, and answer
-- the state. Or, with ARGV[1] = "force", an operator's open / closed / reset.
--
-- KEYS[1] state hash: st (0 closed, 1 half-open, 2 open), v (version), until, trips,
--         permits, ok, fail, hs (half-open since), rs/re (ramp start/end), forced
--         (0 none, 1 open, 2 closed), why (reason code); times in Unix ms (Redis TIME)
-- KEYS[2] window hash: ten buckets b<i> = "number total failures slow"
--
-- seed ARGV (for the in-process store a replica falls back to): 2 st, 3 ms until the
--   open time ends, 4 trips, 5 forced, 6 why, 7 ms since the ramp started, 8 ms until it
--   ends: the state as the replica last saw it, so an outage does not reset it.
-- sync ARGV: 2 bucket width ms, 3 min_requests, 4 failure_rate, 5 slow rate (-1: none),
--   6 open_for ms, 7 max_open_for ms, 8 jitter factor, 9 probes, 10 ramp ms,
--   11 probe timeout ms, 12 total, 13 failures, 14 slow, 15 trip reason code (0: none),
--   16 permits wanted, 17 permits returned, 18 probes passed, 19 probes failed
-- Reply: {st, v, until, trips, granted, rs, re, total, failures, slow, now, forced, why}
--
-- Reasons: 1 consecutive_failures, 2 failure_rate, 3 slow_call_rate, 4 probes_failed,
-- 5 probes_passed, 6 forced_open, 7 forced_closed, 8 reset, 9 open_elapsed.

local BUCKETS = 10
local STATE_TTL_MS = 86400000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local fields = redis.call('HMGET', KEYS[1], 'st', 'v', 'until', 'trips', 'permits', 'ok',
  'fail', 'hs', 'rs', 're', 'forced', 'why')
local s = {
  st = tonumber(fields[1]) or 0, v = tonumber(fields[2]) or 0,
  untl = tonumber(fields[3]) or 0, trips = tonumber(fields[4]) or 0,
  permits = tonumber(fields[5]) or 0, ok = tonumber(fields[6]) or 0,
  fail = tonumber(fields[7]) or 0, hs = tonumber(fields[8]) or 0,
  rs = tonumber(fields[9]) or 0, re = tonumber(fields[10]) or 0,
  forced = tonumber(fields[11]) or 0, why = tonumber(fields[12]) or 0,
}

local function clear_window()
  redis.call('DEL', KEYS[2])
end

local function save(granted, total, failures, slow)
  redis.call('HSET', KEYS[1], 'st', s.st, 'v', s.v, 'until', s.untl, 'trips', s.trips,
    'permits', s.permits, 'ok', s.ok, 'fail', s.fail, 'hs', s.hs, 'rs', s.rs, 're', s.re,
    'forced', s.forced, 'why', s.why)
  redis.call('PEXPIRE', KEYS[1], STATE_TTL_MS)
  return {s.st, s.v, s.untl, s.trips, granted, s.rs, s.re, total, failures, slow, now,
    s.forced, s.why}
end

if ARGV[1] == 'force' then
  local action = ARGV[2]
  s.v = s.v + 1
  s.permits, s.ok, s.fail = 0, 0, 0
  if action == 'open' then
    s.st, s.forced, s.why, s.untl = 2, 1, 6, now
  elseif action == 'closed' then
    s.st, s.forced, s.why, s.rs, s.re = 0, 2, 7, 0, 0
    clear_window()
  else
    s.st, s.forced, s.why, s.trips, s.rs, s.re = 0, 0, 8, 0, 0, 0
    clear_window()
  end
  return save(0, 0, 0, 0)
end

if ARGV[1] == 'seed' then
  s.st, s.untl, s.trips = tonumber(ARGV[2]), now + tonumber(ARGV[3]), tonumber(ARGV[4])
  s.forced, s.why = tonumber(ARGV[5]), tonumber(ARGV[6])
  s.rs, s.re = now - tonumber(ARGV[7]), now + tonumber(ARGV[8])
  s.permits, s.ok, s.fail, s.hs, s.v = 0, 0, 0, now, s.v + 1
  if s.st == 1 then
    s.st, s.untl = 2, now  -- half-open again at the next sync, with fresh permits
  end
  return save(0, 0, 0, 0)
end

local width = tonumber(ARGV[2])
local min_requests = tonumber(ARGV[3])
local failure_rate = tonumber(ARGV[4])
local slow_rate = tonumber(ARGV[5])
local open_for = tonumber(ARGV[6])
local max_open_for = tonumber(ARGV[7])
local jitter = tonumber(ARGV[8])
local probes = tonumber(ARGV[9])
local ramp = tonumber(ARGV[10])
local probe_timeout = tonumber(ARGV[11])
local add_total, add_failures, add_slow = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local trip = tonumber(ARGV[15])
local wanted, returned = tonumber(ARGV[16]), tonumber(ARGV[17])
local passed, failed = tonumber(ARGV[18]), tonumber(ARGV[19])

-- The window: the replica's counts go into the bucket of now; buckets older than the
-- window are ignored (and overwritten when their slot comes round again).
local number = math.floor(now / width)
local slot = 'b' .. (number % BUCKETS)
local total, failures, slow = 0, 0, 0
if add_total > 0 then
  local held = redis.call('HGET', KEYS[2], slot)
  local n, bt, bf, bs = number, 0, 0, 0
  if held then
    local hn, ht, hf, hsl = string.match(held, '^(%d+) (%d+) (%d+) (%d+)$')
    if tonumber(hn) == number then
      bt, bf, bs = tonumber(ht), tonumber(hf), tonumber(hsl)
    end
  end
  redis.call('HSET', KEYS[2], slot, n .. ' ' .. (bt + add_total) .. ' ' ..
    (bf + add_failures) .. ' ' .. (bs + add_slow))
  redis.call('PEXPIRE', KEYS[2], width * BUCKETS * 2)
end
local buckets = redis.call('HGETALL', KEYS[2])
for i = 2, #buckets, 2 do
  local hn, ht, hf, hsl = string.match(buckets[i], '^(%d+) (%d+) (%d+) (%d+)$')
  if hn and tonumber(hn) > number - BUCKETS then
    total = total + tonumber(ht)
    failures = failures + tonumber(hf)
    slow = slow + tonumber(hsl)
  end
end

local function open(reason)
  -- Trips in a row double the open time (failed probes are one more); a trip from a
  -- closed state whose ramp ended a window ago starts afresh.
  if s.st == 0 and now >= s.re + width * BUCKETS then
    s.trips = 0
  end
  s.trips = s.trips + 1
  local base = math.min(open_for * 2 ^ (s.trips - 1), max_open_for)
  s.st, s.untl, s.why, s.v = 2, now + math.floor(base * jitter), reason, s.v + 1
  s.permits, s.ok, s.fail = 0, 0, 0
  clear_window()
  total, failures, slow = 0, 0, 0
end

if s.forced == 0 then
  if s.st == 0 then
    local reason = trip
    if reason == 0 and total >= min_requests then
      if failures >= failure_rate * total then
        reason = 2
      elseif slow_rate >= 0 and slow >= slow_rate * total then
        reason = 3
      end
    end
    if reason ~= 0 then
      open(reason)
    end
  elseif s.st == 2 and now >= s.untl then
    s.st, s.v, s.why, s.hs = 1, s.v + 1, 9, now
    s.permits, s.ok, s.fail = probes, 0, 0
  elseif s.st == 1 then
    s.permits = s.permits + returned
    s.ok = s.ok + passed
    s.fail = s.fail + failed
    if s.fail > 0 and s.fail >= failure_rate * probes then
      open(4)
    elseif s.ok + s.fail >= probes then
      s.st, s.v, s.why, s.rs, s.re = 0, s.v + 1, 5, now, now + ramp
      s.permits, s.ok, s.fail = 0, 0, 0
      clear_window()
      total, failures, slow = 0, 0, 0
    elseif s.permits == 0 and now - s.hs > probe_timeout then
      -- Probes that never reported (a replica gone with its permits): probe again.
      s.permits, s.hs = probes - s.ok - s.fail, now
    end
  end
end

local granted = 0
if s.st == 1 and wanted > 0 then
  granted = math.min(wanted, s.permits)
  s.permits = s.permits - granted
end
return save(granted, total, failures, slow)
