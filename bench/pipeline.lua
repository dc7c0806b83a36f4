-- wrk: DEPTH requests of wrk.path sent in one write (HTTP/1.1 pipelining), so that the load
-- generator spends fewer system calls, and less CPU, per request than one request per write.
--   wrk -s bench/pipeline.lua ...        (DEPTH=8 by default)
local depth = tonumber(os.getenv("DEPTH") or "8")

init = function(args)
   local r = {}
   for i = 1, depth do
      r[i] = wrk.format(nil, wrk.path)
   end
   req = table.concat(r)
end

request = function()
   return req
end
