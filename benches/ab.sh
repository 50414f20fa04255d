#!/usr/bin/env bash
# Two session-proxy targets at the same time: two builds, two configs or
# two paths, to judge a difference of a few percent on a machine whose
# speed drifts by tens of percent from one second to the next.
#
#   benches/ab.sh BIN_A BIN_B [PATH]
#     BIN_A, BIN_B  session-proxy binaries (the same one twice to compare
#                   paths, stores or configs)
#     PATH          /bypass/x (default), /read/x or /write/x, for both sides
#   env: ROUNDS (7), DURATION (5, seconds), CONNS (16 per side),
#        PATH_A, PATH_B: one side's path (default PATH),
#        STORE (memory; or disk, redis), STORE_A, STORE_B: one side's store,
#        REDIS_URL (redis://127.0.0.1:6379),
#        A_SESSION, B_SESSION: extra [session] lines for one side
#        (e.g. B_SESSION='touch_interval = 0'),
#        A_SERVER, B_SERVER: extra [server] lines for one side
#        (e.g. B_SERVER='access_log = "/tmp/access.log"'),
#        PEER_B=lua: side B is the nginx + Lua session peer
#        (../shared/peers/nginx-lua-session, benches/peers.sh) instead of
#        BIN_B, which is then not used; one start, so one of its LuaJIT
#        states (its NOTES.md): run it more than once,
#        TLS=1: both proxies listen with HTTPS (a self-signed certificate
#        made here) and wrk speaks TLS to them, over kept-alive
#        connections as ever: the cost of TLS records, not of handshakes,
#        SESSIONS_A, SESSIONS_B: store that many sessions in each proxy
#        first (benches/wrk/prefill.lua), then read a random one per
#        request (benches/wrk/scale.lua, wrk -t1) instead of one session
#        per connection: the scale target with the same binary twice,
#        e.g. SESSIONS_A=1000 SESSIONS_B=1000000 ab.sh BIN BIN /read/x
#   e.g. the session read against the bypassed path of one build:
#        PATH_A=/bypass/x PATH_B=/read/x benches/ab.sh BIN BIN
#
# benches/run.sh runs its targets one after the other. Here both sides
# run at once on CPU 1, each a proxy with its own upstream (nginx, one
# worker), each loaded by its own wrk on CPU 0 (benches/wrk/session.lua:
# one session per connection). A drift of the machine's speed hits both
# in the same instant. Each round prints, per side, req/s, the proxy's CPU
# time per request and that of proxy and upstream together (from /proc,
# user + system), and B/A of each; the summary gives the median and range
# of B/A over the rounds.
#
# The scheduler shares CPU 1 between the sides, which pulls their req/s
# towards each other: B/A of req/s understates a difference. The CPU
# ratios do not depend on the shares. "proxy + upstream" is the one to
# set beside run.sh's req/s ratios: there each target has CPU 1 to itself,
# where proxy and upstream spend all of it, so its req/s is 1 / (their CPU
# per request). A store's own server (Redis) is counted in neither.
# One build against itself gave B/A within 1.2 % in every
# round (benches/HISTORY.md, round 10).
#
# Ports: upstreams 18480 (A) and 18490 (B), proxies 18481 (A) and 18482 (B).
set -euo pipefail

usage="usage: ab.sh BIN_A BIN_B [PATH]"
BIN_A=${1:?$usage}
BIN_B=${2:?$usage}
PATH_A=${PATH_A:-${3:-/bypass/x}}
PATH_B=${PATH_B:-${3:-/bypass/x}}
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-5}
CONNS=${CONNS:-16}
STORE_A=${STORE_A:-${STORE:-memory}}
STORE_B=${STORE_B:-${STORE:-memory}}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
SESSIONS_A=${SESSIONS_A:-}
SESSIONS_B=${SESSIONS_B:-}
PEER_B=${PEER_B:-}
TLS=${TLS:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=/tmp/session-proxy-ab
for b in "$BIN_A" "$BIN_B"; do
    [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
done
if [ -n "$SESSIONS_A$SESSIONS_B" ] &&
    { [ -z "$SESSIONS_A" ] || [ -z "$SESSIONS_B" ] || [ "$STORE_A$STORE_B" != memorymemory ]; }; then
    echo "SESSIONS_A and SESSIONS_B go together, with the memory store" >&2
    exit 2
fi
case $PEER_B in "" | lua) ;; *) echo "PEER_B is lua or nothing" >&2; exit 2 ;; esac
case $TLS$PEER_B in "" | 1 | lua) ;; *) echo "TLS is 1 or nothing, and not with PEER_B" >&2; exit 2 ;; esac
for b in nginx wrk taskset setsid python3; do
    command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 1; }
done

rm -rf "$DIR"
mkdir -p "$DIR"
SCHEME=http
SERVER_TLS=""
if [ "$TLS" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$DIR/tls.key" -out "$DIR/tls.pem" 2>/dev/null
    SCHEME=https
    SERVER_TLS="tls_cert = \"$DIR/tls.pem\"
tls_key = \"$DIR/tls.key\""
fi
PIDS=()
stop() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for side in a b; do
        [ -f "$DIR/up-$side/nginx.pid" ] && kill -QUIT "$(cat "$DIR/up-$side/nginx.pid")" 2>/dev/null
    done
    return 0
}
trap stop EXIT

# shellcheck source=benches/proxy-toml.sh
source "$ROOT/benches/proxy-toml.sh"
# shellcheck source=benches/peers.sh
source "$ROOT/benches/peers.sh"
SECRET=ab-benchmark-secret-key-0123456789abcdef
wait_for_port() {
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.1
    done
    echo "nothing listens on $1: see $DIR" >&2
    exit 1
}
start() { # SIDE UPSTREAM_PORT PROXY_PORT BIN STORE EXTRA_SESSION_LINES EXTRA_SERVER_LINES
    local up="$DIR/up-$1" store=""
    mkdir -p "$up/tmp"
    sed "s/127.0.0.1:18280/127.0.0.1:$2/" "$ROOT/benches/wrk/nginx-upstream.conf" > "$up/nginx.conf"
    taskset -c 1 nginx -p "$up/" -c "$up/nginx.conf" -e "$up/error.log"
    if [ "$1" = b ] && [ "$PEER_B" = lua ]; then
        start_lua_peer "$2" "$3"
        return
    fi
    case $5 in
        memory) # both sides alike, with room for what the prefill's last requests add
            [ -n "$SESSIONS_A" ] && store="max_entries = $(((SESSIONS_A > SESSIONS_B ? SESSIONS_A : SESSIONS_B) + 100000))" ;;
        disk) store="path = \"$DIR/$1-sessions\"" ;;
        redis) store="url = \"$REDIS_URL\"
key_prefix = \"bench-ab-$1-$$:\"" ;;
        *) echo "a store is memory, disk or redis" >&2; exit 2 ;;
    esac
    local extra=$6
    # Prefilled sessions: no touches on either side. With the default
    # touch_interval (60 s), the first read of a session stored more than
    # 60 s earlier also writes its access time; the larger side's prefill
    # outlasts that and its reads are mostly first reads, so it would pay
    # read + touch where the smaller one pays read.
    if [ -n "$SESSIONS_A" ] && [[ $extra != *touch_interval* ]]; then
        extra="touch_interval = 3600${extra:+
$extra}"
    fi
    proxy_toml "$3" "$2" "$SECRET" "$5" "$store" |
        awk -v extra="$extra" -v tls="$SERVER_TLS" -v server="$7" '{ print }
            /^\[server\]$/ && tls != "" { print tls }
            /^\[server\]$/ && server != "" { print server }
            /^\[session\]$/ && extra != "" { print extra }' > "$DIR/$1.toml"
    RUST_LOG=warn taskset -c 1 setsid "$4" run -c "$DIR/$1.toml" > "$DIR/$1.log" 2>&1 &
    PIDS+=("$!")
    wait_for_port "$2"
    wait_for_port "$3"
}
start_lua_peer() { # UPSTREAM_PORT PROXY_PORT: side B
    local prefix="$DIR/lua-b" why
    why=$(lua_peer_prepare "$prefix" "$2" "$1") || { echo "PEER_B=lua: $why" >&2; exit 1; }
    SESSION_PROXY_SECRET_KEYS=$SECRET taskset -c 1 nginx -p "$prefix/" -c "$prefix/nginx.conf" -e "$prefix/error.log"
    wait_for_port "$1"
    wait_for_port "$2"
    PIDS+=("$(cat "$prefix/nginx.pid")")  # the master; ticks() adds its worker
}
# wait_for_port only asks whether something listens: a server left over
# from an earlier run on one of these ports would be measured instead.
for port in 18480 18481 18482 18490; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port 127.0.0.1:$port is taken by something that is not ours" >&2
        exit 1
    fi
done
start a 18480 18481 "$BIN_A" "$STORE_A" "${A_SESSION:-}" "${A_SERVER:-}"
start b 18490 18482 "$BIN_B" "$STORE_B" "${B_SESSION:-}" "${B_SERVER:-}"

prefill() { # SIDE PORT COUNT
    local file="$DIR/$1.cookies" wrk_pid
    COUNT=$3 COOKIES_OUT="$file" taskset -c 0 wrk -t1 -c32 -d3600s --timeout 5s \
        -s "$ROOT/benches/wrk/prefill.lua" "$SCHEME://127.0.0.1:$2/write/prefill" > "$DIR/prefill-$1.txt" 2>&1 &
    wrk_pid=$!
    while [ -d "/proc/$wrk_pid" ] && [ "$(cat "$file" 2>/dev/null | wc -l)" -lt "$3" ]; do sleep 0.5; done
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" || true
    [ "$(wc -l < "$file")" -ge "$3" ] || { echo "prefill of $1 stopped early: $DIR/prefill-$1.txt" >&2; exit 1; }
}
if [ -n "$SESSIONS_A" ]; then
    prefill a 18481 "$SESSIONS_A"
    prefill b 18482 "$SESSIONS_B"
fi

# CPU ticks of a process and its children (nginx: master and worker).
ticks() { # PID...
    local pid total=0
    for pid in "$@" $(pgrep -P "$(echo "$@" | tr ' ' ',')" || true); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}
upstream_pid() { cat "$DIR/up-$1/nginx.pid"; }
load() { # SIDE PORT PATH
    if [ -n "$SESSIONS_A" ]; then
        COOKIES="$DIR/$1.cookies" taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$ROOT/benches/wrk/scale.lua" \
            "$SCHEME://127.0.0.1:$2$3" > "$DIR/wrk-$1.txt" 2>&1
    else
        taskset -c 0 wrk -t"$CONNS" -c"$CONNS" -d"${DURATION}s" -s "$ROOT/benches/wrk/session.lua" \
            "$SCHEME://127.0.0.1:$2$3" > "$DIR/wrk-$1.txt" 2>&1
    fi
}

B_IS="$BIN_B $PATH_B $STORE_B${B_SESSION:+ ($B_SESSION)}${B_SERVER:+ ($B_SERVER)}${SESSIONS_B:+, $SESSIONS_B sessions}"
[ "$PEER_B" = lua ] && B_IS="the nginx + Lua peer $PATH_B"
echo "# $(date -u +%FT%TZ)${TLS:+ over TLS} A: $BIN_A $PATH_A $STORE_A${A_SESSION:+ ($A_SESSION)}${A_SERVER:+ ($A_SERVER)}${SESSIONS_A:+, $SESSIONS_A sessions}; B: $B_IS"
printf 'round\tA_rps\tA_proxy_us\tA_total_us\tB_rps\tB_proxy_us\tB_total_us\tB/A_rps\tB/A_proxy\tB/A_total\n' > "$DIR/rounds.tsv"
cat "$DIR/rounds.tsv"
for round in $(seq "$ROUNDS"); do
    before="$(ticks "${PIDS[0]}") $(ticks "$(upstream_pid a)") $(ticks "${PIDS[1]}") $(ticks "$(upstream_pid b)")"
    # Who starts first alternates, so neither side is always ahead.
    if [ $((round % 2)) = 1 ]; then
        load a 18481 "$PATH_A" & first=$!
        load b 18482 "$PATH_B" & second=$!
    else
        load b 18482 "$PATH_B" & first=$!
        load a 18481 "$PATH_A" & second=$!
    fi
    wait "$first" "$second"
    after="$(ticks "${PIDS[0]}") $(ticks "$(upstream_pid a)") $(ticks "${PIDS[1]}") $(ticks "$(upstream_pid b)")"
    python3 - "$round" "$DURATION" "$(getconf CLK_TCK)" "$before" "$after" "$DIR" <<'EOF' | tee -a "$DIR/rounds.tsv"
import re, sys
round_, secs, hz, before, after, d = sys.argv[1:]
spent = [(int(y) - int(x)) / float(hz) * 1e6 for x, y in zip(before.split(), after.split())]
def requests(side):
    text = open(f"{d}/wrk-{side}.txt").read()
    found = re.search(r"(\d+) requests in", text)
    if not found or "Non-2xx" in text or "Socket errors" in text:
        sys.exit(f"wrk against {side} failed or saw errors: {d}/wrk-{side}.txt")
    return int(found.group(1))
ra, rb = requests("a"), requests("b")
pa, ta = spent[0] / ra, (spent[0] + spent[1]) / ra
pb, tb = spent[2] / rb, (spent[2] + spent[3]) / rb
print(f"{round_}\t{ra / float(secs):.0f}\t{pa:.1f}\t{ta:.1f}\t{rb / float(secs):.0f}\t{pb:.1f}\t{tb:.1f}"
      f"\t{rb / ra:.3f}\t{pb / pa:.3f}\t{tb / ta:.3f}")
EOF
done
python3 - "$DIR/rounds.tsv" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()[1:]]
for name, col in (("req/s", 7), ("proxy CPU per request", 8), ("proxy + upstream CPU per request", 9)):
    values = [float(r[col]) for r in rows]
    median = statistics.median(values)
    print(f"B/A {name}: median {median:.3f} (rounds {min(values):.3f}..{max(values):.3f})"
          + (f"; A/B {1 / median:.3f}" if col > 7 else ""))
EOF
