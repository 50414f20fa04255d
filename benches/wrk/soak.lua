-- benches/soak.sh's HTTP/1.1 load: every wrk connection is one user (run
-- it with -tN -cN, as session.lua) who keeps the cookie it is given and
-- does, at random, everything a user and an app do to a session: reads,
-- writes small and large, kills, regenerations, requests bodies, downloads,
-- and the hostile things too: a forged cookie, an update the proxy refuses.
-- done() prints the status classes, so a run shows it was not all errors.
local name = os.getenv("COOKIE_NAME") or "session_id"
local pattern = "^" .. name:gsub("%p", "%%%0") .. "=([^;]*)"

-- { weight, method, path, body, expected status }
local actions = {
   { 40, "GET",  "/read/x",    nil, 200 },
   { 20, "GET",  "/write/x",   nil, 200 },
   { 8,  "GET",  "/bypass/x",  nil, 200 },
   { 5,  "GET",  "/big/x",     nil, 200 },
   { 5,  "POST", "/write/form", string.rep("field=value&", 300), 200 },
   { 4,  "GET",  "/file/256k", nil, 200 },
   { 3,  "GET",  "/regen/x",   nil, 200 },
   { 3,  "GET",  "/kill/x",    nil, 200 },
   { 3,  "GET",  "/toobig/x",  nil, 502 },
   { 3,  "GET",  "/bad/x",     nil, 502 },
   { 3,  "FORGED", "/write/x", nil, 200 },
   { 3,  "NOCOOKIE", "/write/x", nil, 200 },
}
local total = 0
for _, a in ipairs(actions) do total = total + a[1] end

local own = nil
local expected = 200
-- Global, so that done() can read each thread's with thread:get.
counts = { ok = 0, unexpected = 0 }

local threads = {}
function setup(thread)
   table.insert(threads, thread)
   thread:set("seed", #threads)
end

function init(args)
   math.randomseed(os.time() * 1000 + (seed or 0))
end

-- DELAY_MS: a mean pause between requests, exponential, as pace.lua.
local delay_ms = tonumber(os.getenv("DELAY_MS") or "")
if delay_ms then
   function delay()
      return math.floor(-delay_ms * math.log(1 - math.random()) + 0.5)
   end
end

local function pick()
   local r = math.random(total)
   for _, a in ipairs(actions) do
      r = r - a[1]
      if r <= 0 then return a end
   end
end

function request()
   local a = pick()
   local method, path, body = a[2], a[3], a[4]
   expected = a[5]
   local cookie = own
   if method == "FORGED" then
      method = "GET"
      if cookie then
         -- The last character changed: the signature no longer matches.
         local last = cookie:sub(-1) == "A" and "B" or "A"
         cookie = cookie:sub(1, -2) .. last
      end
   elseif method == "NOCOOKIE" then
      method, cookie = "GET", nil
   end
   local headers = { ["Cookie"] = cookie and (name .. "=" .. cookie) or "theme=dark" }
   if body then headers["Content-Type"] = "application/x-www-form-urlencoded" end
   return wrk.format(method, path, headers, body)
end

function response(status, headers, body)
   if status == expected then
      counts.ok = counts.ok + 1
   else
      counts.unexpected = counts.unexpected + 1
   end
   for key, value in pairs(headers) do
      if key:lower() == "set-cookie" then
         local found = value:match(pattern)
         if found then own = found ~= "" and found or nil end
      end
   end
end

function done(summary, latency, requests)
   local ok, unexpected = 0, 0
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      ok = ok + c.ok
      unexpected = unexpected + c.unexpected
   end
   io.write(string.format("soak: %d responses as expected, %d not\n", ok, unexpected))
end
