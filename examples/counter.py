#!/usr/bin/env python3
"""web.py's session counter, as a legacy app that sits behind session-proxy.

The app never sees the session cookie. session-proxy loads the session and
sends it in the `X-Session` request header as an HS256 JWT; the app verifies
it with the shared secret and answers with response headers that the proxy
applies and strips:

    X-Session-Update: {"count": 3}    a JSON merge patch (null deletes a key)
    X-Session-Action: kill            session.kill(); or "regenerate" (new id)

Routes: /count, /reset (as in the web.py cookbook), /login?user=NAME,
/logout, and / (shows the session).

    SESSION_PROXY_SECRET_KEYS=... python3 examples/counter.py --port 8000

Standard library only.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SESSION_HEADER = os.environ.get("SESSION_HEADER", "X-Session")
CLOCK_SKEW = 5  # seconds an `iat` may lie in the future (clocks drift)


def secret_keys():
    """The proxy's keys. The proxy signs with the first; any of them is
    accepted here, so during a rotation the app can get the new key first."""
    raw = os.environ.get("SESSION_PROXY_SECRET_KEYS") or os.environ.get("COUNTER_SECRET")
    keys = [k.strip() for k in (raw or "").split(",") if k.strip()]
    if not keys:
        sys.exit("counter.py: set SESSION_PROXY_SECRET_KEYS (the proxy's secret keys, comma-separated)")
    return [k.encode("utf-8") for k in keys]


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signature(key, signed):
    """The JWT signature of `signed` (header.claims) under `key`, as base64url bytes."""
    return base64.urlsafe_b64encode(hmac.new(key, signed, hashlib.sha256).digest()).rstrip(b"=")


def verify_token(token, keys):
    """The claims of a valid token, or None."""
    try:
        header_b64, claims_b64, given = token.split(".")
        signed, given = f"{header_b64}.{claims_b64}".encode("ascii"), given.encode("ascii")
        header = json.loads(b64url_decode(header_b64))
        claims = json.loads(b64url_decode(claims_b64))
    except (ValueError, UnicodeError):  # also covers binascii.Error, JSONDecodeError
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return None
    if not any(hmac.compare_digest(given, signature(key, signed)) for key in keys):
        return None
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not (isinstance(exp, int) and isinstance(iat, int)) or exp <= now or iat > now + CLOCK_SKEW:
        return None
    if not isinstance(claims.get("data"), dict):
        return None
    return claims


class Counter(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive to the proxy
    # One write per response and no Nagle: otherwise Nagle + delayed ACK add
    # ~40 ms to every keep-alive request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    keys = []

    def log_message(self, fmt, *args):  # no access log: the proxy has one
        pass

    def reply(self, status, body, update=None, action=None):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if update is not None:
            self.send_header("X-Session-Update", json.dumps(update))
        if action is not None:
            self.send_header("X-Session-Action", action)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        # A body on a GET is unusual but legal; read it so keep-alive stays in step.
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        claims = verify_token(self.headers.get(SESSION_HEADER, ""), self.keys)
        if claims is None:
            return self.reply(401, "missing or invalid session token")
        data = claims["data"]
        url = urlsplit(self.path)

        if url.path == "/count":
            count = data.get("count", 0)
            count = (count if isinstance(count, int) else 0) + 1
            self.reply(200, str(count), update={"count": count})
        elif url.path == "/reset":
            self.reply(200, "", action="kill")
        elif url.path == "/login":
            user = parse_qs(url.query).get("user", [""])[0]
            if not user:
                return self.reply(400, "usage: /login?user=NAME")
            # A new session id at login, so an id planted before it is worthless.
            self.reply(200, f"logged in as {user}", update={"user": user}, action="regenerate")
        elif url.path == "/logout":
            self.reply(200, "logged out", update={"user": None})
        elif url.path == "/":
            self.reply(200, "\n".join([
                "GET /count              count this visit",
                "GET /reset              forget the session",
                "GET /login?user=NAME    store NAME, with a new session id",
                "GET /logout             remove the user",
                "",
                f"session {claims.get('sid', '')[:8]}... (new: {claims.get('new')}, version {claims.get('ver')}):",
                json.dumps(data, indent=2, sort_keys=True),
                "",
            ]))
        else:
            self.reply(404, "not found")

    do_HEAD = do_GET


def main():
    ap = argparse.ArgumentParser(description="web.py's session counter behind session-proxy")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    Counter.keys = secret_keys()

    ThreadingHTTPServer.request_queue_size = 256  # the proxy opens connections in bursts
    server = ThreadingHTTPServer((args.host, args.port), Counter)
    print(f"counter.py listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
