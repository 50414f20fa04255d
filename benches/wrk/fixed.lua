-- One fixed session cookie on every request of every connection, as the
-- peers' bench.sh send it: many connections of one browser.
-- env: COOKIE (the value, required), COOKIE_NAME (session_id)
local name = os.getenv("COOKIE_NAME") or "session_id"
local value = os.getenv("COOKIE") or error("fixed.lua: set COOKIE")
wrk.headers["Cookie"] = "theme=dark; " .. name .. "=" .. value .. "; lang=en"

-- DELAY_MS, DELAY_DIST: pauses between requests (pace.lua, beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "pace.lua")
