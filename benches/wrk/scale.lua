-- The read path over many live sessions: each request carries the cookie
-- of a session drawn at random from COOKIES (one value per line, as
-- prefill.lua writes them), so the store is read all over, not 32 hot
-- entries. Run with -t1 (each thread loads the whole file).
-- env: COOKIES (required), COOKIE_NAME (session_id)
--
-- The cookies stay in the file's one string, cut out by offset: every
-- value has the same length (ID.TAG, 66 characters). A table of 10^6
-- strings made wrk itself stall: each request's header is a new string,
-- and every garbage collection LuaJIT then ran marked the whole table in
-- one step, tens of ms in which wrk sent nothing and counted the replies
-- it had not read as slow (benches/HISTORY.md round 8: p99 108 ms against
-- 4 ms, the same 1 000 sessions read from the same proxy).
local name = os.getenv("COOKIE_NAME") or "session_id"
local path = os.getenv("COOKIES") or error("scale.lua: set COOKIES")
local file = assert(io.open(path))
local all = file:read("*a")
file:close()
local width = (all:find("\n", 1, true) or error("scale.lua: no cookies in " .. path)) - 1
local stride = width + 1
local count = #all / stride
for newline = stride, #all + stride - 1, stride do
   assert(all:byte(newline) == 10,
      "scale.lua: the values in " .. path .. " are not all " .. width .. " characters long")
end
local prefix, suffix = "theme=dark; " .. name .. "=", "; lang=en"
math.randomseed(os.time())

function request()
   local start = (math.random(count) - 1) * stride + 1
   wrk.headers["Cookie"] = prefix .. all:sub(start, start + width - 1) .. suffix
   return wrk.format()
end
