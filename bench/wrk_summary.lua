-- wrk_summary.lua: print wrk's totals as one machine-readable line when the run ends.
-- Only `done` is defined: without `request`/`response` functions wrk stays on its
-- static fast path, so the script costs nothing per request. Latencies are in µs.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_SUMMARY requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d"
      .. " p50_us=%.1f p99_us=%.1f max_us=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
