-- The read path over many live sessions: each request carries the cookie
-- of a session drawn at random from COOKIES (one value per line, as
-- prefill.lua writes them), so the store is read all over, not 32 hot
-- entries. Run with -t1 (each thread loads the whole file).
-- env: COOKIES (required), COOKIE_NAME (session_id)
local name = os.getenv("COOKIE_NAME") or "session_id"
local cookies = {}
for line in assert(io.open(os.getenv("COOKIES") or error("scale.lua: set COOKIES"))):lines() do
   cookies[#cookies + 1] = line
end
assert(#cookies > 0, "scale.lua: no cookies in " .. os.getenv("COOKIES"))
local prefix, suffix = "theme=dark; " .. name .. "=", "; lang=en"
math.randomseed(os.time())

function request()
   wrk.headers["Cookie"] = prefix .. cookies[math.random(#cookies)] .. suffix
   return wrk.format()
end
