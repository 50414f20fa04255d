#!/usr/bin/env bash
# Instructions per request of one path through session-proxy, under
# callgrind: repeatable for the same binary and load whatever else the
# machine is doing, so it can judge a change that wrk's noise hides.
#
#   benches/callgrind.sh BIN PATH [STORE] [OUT]
#     BIN    a session-proxy binary (a release build: target/release/session-proxy),
#            or with STORE=bare a baseline: target/release/examples/bare_pingora
#            or .../examples/core_loop,
#            or with STORE=nginx an nginx binary (benches/wrk/nginx-proxy.conf)
#     PATH   /bypass/x, /read/x or /write/x (see benches/run.sh's targets)
#     STORE  memory (default), disk or redis (REDIS_URL, default
#            redis://127.0.0.1:6379, keys under "callgrind:"); bare: a baseline
#            (LISTEN UPSTREAM); nginx: nginx as a plain reverse proxy, one process
#     OUT    the callgrind file (default /tmp/session-proxy-callgrind/PATH.out)
#
# The upstream is benches/wrk/nginx-upstream.conf on port 18380, the proxy
# listens on 18381 (benches/run.sh uses 18280-18298). wrk -t1 -c4 on one
# session (COOKIES=users: -t4 -c4 with benches/wrk/session.lua, a session
# per connection, as benches/run.sh loads it; a shared store's writes of
# one session would otherwise race each other): 3 s to warm up, counters
# zeroed, 6 s counted. Prints the
# instructions per request in all and in the allocator (mimalloc's mi_*
# functions, exclusive), then the functions that cost most.
set -euo pipefail

BIN=${1:?usage: callgrind.sh BIN PATH [STORE] [OUT]}
REQ_PATH=${2:?usage: callgrind.sh BIN PATH [STORE] [OUT]}
KIND=${3:-memory}
DIR=/tmp/session-proxy-callgrind
OUT=${4:-$DIR/$(echo "$REQ_PATH" | tr -c 'a-z0-9\n' '_').out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UP_PORT=18380 PROXY_PORT=18381
for b in valgrind callgrind_control callgrind_annotate nginx wrk curl python3; do
    command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 1; }
done

rm -rf "$DIR/up" "$DIR/sessions"
mkdir -p "$DIR/up/tmp"
sed "s/127.0.0.1:18280/127.0.0.1:$UP_PORT/" "$ROOT/benches/wrk/nginx-upstream.conf" > "$DIR/up/nginx.conf"
nginx -p "$DIR/up/" -c "$DIR/up/nginx.conf" -e "$DIR/up/error.log"
# shellcheck source=benches/proxy-toml.sh
source "$ROOT/benches/proxy-toml.sh"
store=""
[ "$KIND" = disk ] && store="path = \"$DIR/sessions\""
[ "$KIND" = redis ] && store="url = \"${REDIS_URL:-redis://127.0.0.1:6379}\"
key_prefix = \"callgrind:\""
if [ "$KIND" = bare ]; then
    args=("127.0.0.1:$PROXY_PORT" "127.0.0.1:$UP_PORT")
elif [ "$KIND" = nginx ]; then
    rm -rf "$DIR/px"
    mkdir -p "$DIR/px/tmp"
    sed -e "s/127.0.0.1:18280/127.0.0.1:$UP_PORT/" -e "s/127.0.0.1:18281/127.0.0.1:$PROXY_PORT/" \
        "$ROOT/benches/wrk/nginx-proxy.conf" > "$DIR/px/nginx.conf"
    # In the foreground and in one process, so that valgrind follows it.
    args=(-p "$DIR/px/" -c "$DIR/px/nginx.conf" -e "$DIR/px/error.log" -g "daemon off; master_process off;")
else
    proxy_toml "$PROXY_PORT" "$UP_PORT" "callgrind-benchmark-secret-key-0123456789" "$KIND" "$store" > "$DIR/proxy.toml"
    args=(run -c "$DIR/proxy.toml")
fi
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN" "${args[@]}" \
    > "$DIR/proxy.log" 2>&1 &
VG=$!
stop() {
    kill "$VG" 2>/dev/null || true
    kill -QUIT "$(cat "$DIR/up/nginx.pid")" 2>/dev/null || true
}
trap stop EXIT

url=http://127.0.0.1:$PROXY_PORT
for _ in $(seq 100); do curl -s -o /dev/null "$url/bypass/" && break; sleep 0.3; done
if [ "$KIND" = bare ] || [ "$KIND" = nginx ]; then
    cookie=none  # passed on as it is, as a bypassed path does with other cookies
else
    cookie=$(curl -s -D - -o /dev/null "$url/write/login" | sed -n 's/^[Ss]et-[Cc]ookie: session_id=\([^;]*\).*/\1/p')
    [ -n "$cookie" ] || { echo "no session cookie from $url/write/login" >&2; exit 1; }
fi
load=(-t1 -c4 -H "Cookie: session_id=$cookie")
[ "${COOKIES:-}" = users ] && load=(-t4 -c4 -s "$ROOT/benches/wrk/session.lua")
wrk "${load[@]}" -d3s "$url$REQ_PATH" > /dev/null
callgrind_control -z "$VG" > /dev/null 2>&1
requests=$(wrk "${load[@]}" -d6s "$url$REQ_PATH" | awk '/requests in/{print $1}')
callgrind_control -d "$VG" > /dev/null 2>&1
[ "${requests:-0}" -gt 0 ] 2>/dev/null || { echo "wrk completed no request through $url$REQ_PATH" >&2; exit 1; }
dump=$OUT.1
[ -s "$dump" ] || dump=$OUT

# Exclusive instructions per function: a cost line counts for the current
# fn= unless it follows a calls= line (that cost is the callee's).
python3 - "$dump" "$requests" "$KIND $REQ_PATH" <<'EOF'
import collections, re, sys
path, requests, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
names, exclusive, current, after_call = {}, collections.Counter(), None, False
def name(text):
    m = re.match(r'\((\d+)\)(?: (.*))?', text)
    if not m:
        return text
    if m.group(2):
        names[m.group(1)] = m.group(2)
    return names.get(m.group(1), m.group(1))
for line in open(path):
    if line.startswith('fn='):
        current = name(line[3:].rstrip('\n'))
    elif line.startswith('cfn='):
        name(line[4:].rstrip('\n'))
    elif line.startswith('calls='):
        after_call = True
    elif line[:1].isdigit() or line[:1] in '+-*':
        if after_call:
            after_call = False
        elif current is not None:
            fields = line.split()
            if len(fields) >= 2:
                exclusive[current] += int(fields[1])
total = sum(exclusive.values())
allocator = sum(c for f, c in exclusive.items() if re.match(r'_?mi_', f))
print(f"{what}: {requests} requests; instructions per request {total / requests:,.0f}, "
      f"of which the allocator {allocator / requests:,.0f}")
for function, cost in exclusive.most_common(15):
    print(f"{cost / requests:9,.0f}  {function[:140]}")
EOF
echo "callgrind file: $dump (callgrind_annotate --inclusive=yes $dump)"
