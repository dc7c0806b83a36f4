-- wrk script for bench/balance.sh.
--
--   wrk ... -s wrk.lua URL                        plain GETs of the URL's path
--   wrk ... -s wrk.lua URL -- users N             X-User: user-0 .. user-(N-1), in turn
--   wrk ... -s wrk.lua URL -- cookies NAME V...   Cookie: NAME=V for each V, in turn
--
-- Requests are built once in init(), so that request() costs one table
-- lookup.  done() prints one BENCH_RESULT line that bench/balance/report.py
-- reads; latencies in microseconds.

local requests = {}
local count = 0
local n = 0

init = function(args)
   local path = wrk.path
   local mode = args[1] or "plain"
   if mode == "users" then
      for i = 0, tonumber(args[2] or "256") - 1 do
         requests[#requests + 1] = wrk.format("GET", path, { ["X-User"] = "user-" .. i })
      end
   elseif mode == "cookies" then
      local name = args[2]
      for i = 3, #args do
         requests[#requests + 1] = wrk.format("GET", path, { ["Cookie"] = name .. "=" .. args[i] })
      end
   end
   if #requests == 0 then
      requests[1] = wrk.format("GET", path)
   end
   n = #requests
end

request = function()
   count = count % n + 1
   return requests[count]
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH_RESULT requests=%d duration_us=%d" ..
      " p50_us=%.0f p99_us=%.0f max_us=%.0f" ..
      " err_connect=%d err_read=%d err_write=%d err_timeout=%d non2xx=%d\n",
      summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status))
end
