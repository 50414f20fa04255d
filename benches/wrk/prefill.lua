-- Creates sessions through the proxy's real write path: every request
-- goes without a session cookie to a path whose upstream answer carries
-- an update, so each one stores a new session and gets its Set-Cookie.
-- The cookie values are appended to COOKIES_OUT (one per line); the
-- thread stops after COUNT responses. Run with -t1.
-- env: COUNT (required), COOKIES_OUT (required), COOKIE_NAME (session_id)
local name = os.getenv("COOKIE_NAME") or "session_id"
local count = tonumber(os.getenv("COUNT") or "") or error("prefill.lua: set COUNT")
local out = assert(io.open(os.getenv("COOKIES_OUT") or error("prefill.lua: set COOKIES_OUT"), "a"))
local pattern = "^" .. name:gsub("%p", "%%%0") .. "=([^;]*)"
local stored = 0
wrk.headers["Cookie"] = "theme=dark; lang=en"

function response(status, headers, body)
   for key, value in pairs(headers) do
      if key:lower() == "set-cookie" then
         local found = value:match(pattern)
         if found and found ~= "" then
            out:write(found, "\n")
            stored = stored + 1
         end
      end
   end
   if stored >= count then
      out:flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   out:close()
end
