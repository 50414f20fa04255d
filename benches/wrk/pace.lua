-- Pauses between requests, for wrk scripts that load it with dofile.
-- DELAY_MS: each connection waits about that long between requests, a
-- fixed offered load for latency comparisons. The pause is drawn from an
-- exponential distribution (DELAY_DIST=exp, the default), so requests
-- arrive as independent users' would (Poisson) rather than in bursts of
-- every connection at once, which a fixed pause (DELAY_DIST=fixed)
-- produces: then p99 measures queueing behind the burst, not the server.
-- wrk counts the pause in whole milliseconds, and one wrk thread sends
-- every request whose pause ends in the same millisecond at once: run one
-- thread per connection (-tN -cN) for independent arrivals.
local delay_ms = tonumber(os.getenv("DELAY_MS") or "")
local delay_dist = os.getenv("DELAY_DIST") or "exp"
if delay_ms then
   function delay()
      if delay_dist == "fixed" then
         return delay_ms
      end
      return math.floor(-delay_ms * math.log(1 - math.random()) + 0.5)
   end
end

-- Every wrk thread has its own Lua state: seed each differently, or all
-- of them draw the same pauses and fire together.
local threads = 0
function setup(thread)
   threads = threads + 1
   thread:set("seed", threads)
end
function init(args)
   math.randomseed(os.time() * 1000 + (seed or 0))
end
