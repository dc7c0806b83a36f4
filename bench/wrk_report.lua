-- wrk "done" hook: print one machine-readable line that bench/report.py parses.
-- Latencies are in microseconds, duration in microseconds, bytes as wrk counts
-- them (status line, headers and body of every response).
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH_RESULT requests=%d duration_us=%d bytes=%d" ..
      " p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f" ..
      " err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
      summary.requests, summary.duration, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.status, e.timeout))
end
