#!/usr/bin/env python3
"""A programmable upstream for session-proxy's end-to-end tests.

    python3 tests/support/upstream.py [--port 0] [--session-header X-Session]
                                      [--tls CERT KEY]

Binds 127.0.0.1 (port 0 = a free port), prints exactly `listening <port>`
on stdout, flushes, and serves until killed. HTTP/1.1 keep-alive, one daemon
thread per connection, any method. Request bodies are read whole (with
Content-Length or chunked) before answering.

Default answer: 200, `Content-Type: application/json`, Content-Length, and
the body

    {"method": "GET",
     "path": "/a?b=c",                   (with the query)
     "headers": [["Host", "..."], ...],  (every request header, in the order
                                          and spelling received, duplicates
                                          kept, underscores kept)
     "body": "...",                      (request body as UTF-8 text, bad
                                          bytes replaced)
     "session": {...} | null,            (the claims of the X-Session JWT,
                                          decoded but NOT verified; null when
                                          absent or undecodable)
     "sni": "name" | null}               (with --tls only: the server name
                                          the client sent, null for none)

Request headers that steer the answer (header names are case-insensitive;
those marked * may be sent several times, each giving one response header):

    X-Test-Update: TEXT *        -> X-Session-Update: TEXT (verbatim)
    X-Test-Action: TEXT *        -> X-Session-Action: TEXT (verbatim)
    X-Test-Status: CODE          -> that status (204, 304 and 1xx: no body,
                                    no Content-Length)
    X-Test-Set-Cookie: VALUE *   -> Set-Cookie: VALUE
    X-Test-Cache-Control: VALUE  -> Cache-Control: VALUE
    X-Test-Header: NAME: VALUE * -> NAME: VALUE
    X-Test-Arrived: PATH         -> creates the file PATH as the request
                                    arrives (its body read), before the rest
    X-Test-Wait-For: PATH        -> then waits until the file PATH exists (30 s
                                    at most): a request held until the test
                                    lets it go
    X-Test-Sleep-Ms: N           -> sleep N ms first (before any fault)
    X-Test-Body-Bytes: N         -> a body of N bytes "a" instead of the JSON,
                                    Content-Type: application/octet-stream
    X-Test-Fault: reset          -> no answer; close with a TCP RST (SO_LINGER 0)
    X-Test-Fault: hang           -> no answer, ever (sleeps an hour)
    X-Test-Fault: garbage        -> writes "NOT HTTP AT ALL\\r\\n\\r\\n", closes
    X-Test-Fault: truncate       -> a 200 head with Content-Length: 100000,
                                    10 bytes of body, then closes
    X-Test-Fault: huge-header    -> the normal answer plus an X-Session-Update
                                    whose value is a 100000-byte JSON object
                                    {"big":"xxx..."}
    X-Test-Fault: huge-head      -> the normal answer plus X-Session-Update
                                    {"a":9} and 20 headers X-Pad-N of 60000
                                    bytes each: a head over 1 MiB
    X-Test-Fault: raw            -> writes the bytes of X-Test-Raw (base64,
                                    standard alphabet) as they are, closes;
                                    for responses no HTTP library would send
    X-Test-Fault: raw-hang       -> the same, then never closes

Path /count (query ignored): web.py's counter, without verifying the token:
n = session.data.count (0 when missing) + 1; body str(n) as text/plain, and
`X-Session-Update: {"count": n}` before any X-Test-Update headers. The other
X-Test-* headers apply as usual.

Standard library only.
"""

import argparse
import base64
import binascii
import http.client
import json
import os
import socket
import ssl
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# http.server refuses header lines over 64 KiB and more than 100 headers. The
# session token grows with max_data_bytes, which a test may set high.
http.client._MAXLINE = 1 << 20
http.client._MAXHEADERS = 1000

HUGE_UPDATE_BYTES = 100_000
NO_BODY_STATUSES = {204, 304}


def token_claims(token):
    """The claims of a compact JWT, unverified; None if it does not decode."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle: otherwise Nagle + delayed ACK add
    # ~40 ms to every keep-alive request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    session_header = "X-Session"

    def log_message(self, fmt, *args):
        pass

    def __getattr__(self, name):
        # http.server dispatches METHOD to do_METHOD: send every method to respond().
        if name.startswith("do_"):
            return self.respond
        raise AttributeError(name)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def respond(self):
        body = self.read_body()
        control = self.headers
        arrived = control.get("X-Test-Arrived")
        if arrived:
            open(arrived, "w").close()
        wait_for = control.get("X-Test-Wait-For")
        if wait_for:
            deadline = time.monotonic() + 30
            while not os.path.exists(wait_for) and time.monotonic() < deadline:
                time.sleep(0.01)
        sleep_ms = control.get("X-Test-Sleep-Ms")
        if sleep_ms:
            time.sleep(int(sleep_ms) / 1000)
        fault = control.get("X-Test-Fault", "").strip().lower()
        if fault in ("reset", "hang", "garbage", "truncate", "raw", "raw-hang"):
            return self.fault(fault)

        path = urlsplit(self.path).path
        session = token_claims(control.get(self.session_header, ""))
        headers = []  # (name, value) response headers beyond the defaults
        if path == "/count":
            count = ((session or {}).get("data") or {}).get("count", 0)
            count = (count if isinstance(count, int) else 0) + 1
            content_type, payload = "text/plain; charset=utf-8", str(count).encode()
            headers.append(("X-Session-Update", json.dumps({"count": count})))
        else:
            content_type = "application/json"
            payload = json.dumps({
                "method": self.command,
                "path": self.path,
                "headers": [[name, value] for name, value in self.headers.items()],
                "body": body.decode("utf-8", errors="replace"),
                "session": session,
                **({"sni": getattr(self.connection, "sni", None)}
                   if isinstance(self.connection, ssl.SSLSocket) else {}),
            }).encode()

        headers += [("X-Session-Update", v) for v in control.get_all("X-Test-Update", [])]
        headers += [("X-Session-Action", v) for v in control.get_all("X-Test-Action", [])]
        headers += [("Set-Cookie", v) for v in control.get_all("X-Test-Set-Cookie", [])]
        if "X-Test-Cache-Control" in control:
            headers.append(("Cache-Control", control["X-Test-Cache-Control"]))
        for line in control.get_all("X-Test-Header", []):
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        if fault == "huge-header":
            filler = "x" * (HUGE_UPDATE_BYTES - len('{"big":""}'))
            headers.append(("X-Session-Update", '{"big":"%s"}' % filler))
        if fault == "huge-head":
            headers.append(("X-Session-Update", '{"a":9}'))
            headers += [("X-Pad-%d" % i, "p" * 60000) for i in range(20)]

        body_bytes = control.get("X-Test-Body-Bytes")
        if body_bytes is not None:
            content_type, length = "application/octet-stream", int(body_bytes)
        else:
            length = len(payload)
        status = int(control.get("X-Test-Status") or 200)
        has_body = status >= 200 and status not in NO_BODY_STATUSES

        self.send_response(status)
        if has_body:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(length))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not has_body or self.command == "HEAD":
            return
        if body_bytes is None:
            self.wfile.write(payload)
        else:
            chunk = b"a" * 65536
            for offset in range(0, length, len(chunk)):
                self.wfile.write(chunk[: length - offset])

    def fault(self, fault):
        self.close_connection = True
        if fault in ("raw", "raw-hang"):
            self.wfile.write(base64.b64decode(self.headers.get("X-Test-Raw", "")))
            self.wfile.flush()
            if fault == "raw-hang":
                time.sleep(3600)
        elif fault == "hang":
            time.sleep(3600)
        elif fault == "garbage":
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif fault == "truncate":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b"a" * 10)
        elif fault == "reset":
            # Linger 0 turns close() into an RST. The handler's file objects
            # keep the connection open until they close, so take the file
            # descriptor away from them and close it now.
            rst = socket.socket(fileno=self.connection.detach())
            rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rst.close()

class Server(ThreadingHTTPServer):
    request_queue_size = 256

    def handle_error(self, request, client_address):
        # Clients that hang up early are part of the tests, not errors; and a
        # test that never reads our stderr must not fill its pipe with tracebacks.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            print(f"upstream.py: {sys.exc_info()[1]!r}", file=sys.stderr, flush=True)


def remember_sni(ssl_socket, server_name, _context):
    ssl_socket.sni = server_name


def main():
    ap = argparse.ArgumentParser(description="programmable upstream for session-proxy's tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--session-header", default=Upstream.session_header)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                    help="speak HTTPS with this PEM certificate chain and key")
    args = ap.parse_args()
    Upstream.session_header = args.session_header

    server = Server(("127.0.0.1", args.port), Upstream)
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        context.sni_callback = remember_sni
        # The handshake runs in the connection's thread, on its first read:
        # a client that never completes one cannot hold up the others.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False)
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
