-- Real users: every wrk connection is one browser with its own session.
-- Run it with as many threads as connections (wrk -tN -cN): wrk gives Lua
-- no connection identity, but each thread has its own Lua state, so one
-- connection per thread makes the state below that connection's.
--
-- The first request goes to LOGIN_PATH (a write path, so the session is
-- stored and Set-Cookie comes back); every later one goes to the URL's
-- path with that cookie. A later Set-Cookie replaces it (Apache rotates
-- its session id on every save). A server that never sets the cookie
-- (the upstream, nginx) gets COOKIE, so every target parses the same
-- header. DELAY_MS: see below.
--
-- env: COOKIE_NAME (session_id), LOGIN_PATH (/write/login; "" = none),
--      COOKIE (fallback value), DELAY_MS, DELAY_DIST
local name = os.getenv("COOKIE_NAME") or "session_id"
local login = os.getenv("LOGIN_PATH") or "/write/login"
local fallback = os.getenv("COOKIE")
local pattern = "^" .. name:gsub("%p", "%%%0") .. "=([^;]*)"

local own = nil
local logged_in = login == ""

local function cookie_header(value)
   if value then
      return "theme=dark; " .. name .. "=" .. value .. "; lang=en"
   end
   return "theme=dark; lang=en"
end

function request()
   if not logged_in then
      -- Without the fallback: a login carrying one shared session would
      -- update that session instead of starting this user's own.
      wrk.headers["Cookie"] = cookie_header(nil)
      return wrk.format(nil, login)
   end
   wrk.headers["Cookie"] = cookie_header(own or fallback)
   return wrk.format(nil, wrk.path)
end

function response(status, headers, body)
   logged_in = true
   for key, value in pairs(headers) do
      if key:lower() == "set-cookie" then
         local found = value:match(pattern)
         if found and found ~= "" then own = found end
      end
   end
end

-- DELAY_MS, DELAY_DIST: pauses between requests (pace.lua, beside this file).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "pace.lua")
