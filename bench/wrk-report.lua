-- wrk script for scripts/bench: the request to send comes from the environment
-- (WRK_METHOD, WRK_BODY), headers from -H; at the end one JSON line with what the benchmark
-- reports. Latencies are in microseconds. No per-response hook: it would slow the client
-- down for every target alike and lower the ceiling being measured. A response with status
-- 400 or above counts in `status_errors` (wrk's own count).
wrk.method = os.getenv("WRK_METHOD") or "GET"
local body = os.getenv("WRK_BODY")
if body and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"p50":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f}\n',
    summary.requests, summary.duration, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
