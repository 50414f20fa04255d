#!/usr/bin/env bash
# The wrk comparison of issue 5, in one run: session-proxy next to its own
# fast upstream, nginx as a plain reverse proxy, and Apache mod_session
# (dbd/sqlite), all behind the same upstream. Same method as the peers'
# bench.sh: wrk on CPU 0, every server on CPU 1 (one worker / threads = 1),
# targets interleaved with a rotated start per round, REPS rounds, medians,
# a wait for a quiet machine before each run, foreign CPU recorded.
#
#   benches/run.sh [OUT_DIR]        (default $BENCH_RUN_DIR/results-<UTC time>)
#
# Phases:
#   1. throughput: every target as fast as it goes (wrk -c$CONNS);
#   2. latency: bypass/read/write at one fixed offered load (each connection
#      waits DELAY_MS on average between requests), for the p99 the session
#      work adds;
#   3. scale: the memory store's read path with 10^3 and SCALE_SESSIONS live
#      sessions (created through the real write path by prefill.lua), read
#      at random by scale.lua; RSS of both proxies.
#
# Targets (ports on 127.0.0.1; the proxies' TOML is written to $BENCH_RUN_DIR):
#   upstream        nginx upstream direct            :18280 /read/x
#   nginx           nginx plain proxy, keepalive     :18281 /read/x
#   pingora         pingora's proxy alone, nothing   :18289 /bypass/x
#                   of ours but the allocator (examples/bare_pingora.rs)
#   pingora-core    a minimal proxy loop on pingora- :18279 /bypass/x
#                   core, without pingora-proxy (examples/core_loop.rs)
#   apache-read     Apache mod_session dbd, read     :18286 /read/x
#   apache-write    Apache mod_session dbd, write    :18286 /write/x
#   lua-bypass      nginx + Lua session peer         :18278 /bypass/x
#   lua-read        (../shared/peers/nginx-lua-      :18278 /read/x
#   lua-write       session), memory store           :18278 /write/x
#   bypass          session-proxy, bypassed path     :18282 /bypass/x  (memory store)
#   read-memory     session read path (no update)    :18282 /read/x
#   write-memory    session write path (every req)   :18282 /write/x
#   read-disk / write-disk                           :18283
#   read-redis / write-redis                         :18284  skipped when `check` fails
#   read-postgres / write-postgres                   :18285  skipped when `check` fails
#   bypass@NAME / read@NAME / write@NAME             :18290+ one per COMPARE entry
#
# env: DURATION (8s) CONNS (32) REPS (3) WARMUP (2s) QUIET_WAIT (60) QUIET_PCT (10)
#      COOKIES (users): users = session.lua, wrk -tCONNS -cCONNS, each connection
#        logs in once (/write/login) and reuses its own session;
#        fixed = fixed.lua, wrk -t1 -cCONNS, one session cookie per target
#      ONLY ("")          space-separated target names to run (default: all)
#      PHASES ("throughput latency scale")
#      DELAY_MS (auto)    latency phase: mean pause per connection between requests;
#                         auto = the pause that offers LOAD_PCT % of the bypassed
#                         path's throughput (its median in this run's throughput
#                         phase, or one WARMUP-long run when that phase is skipped),
#                         so that the load is the same share of any machine
#      LOAD_PCT (25)      the latency phase's offered load with DELAY_MS=auto
#      DELAY_DIST (exp)   exp = exponential pauses (Poisson arrivals); fixed = DELAY_MS
#                         each, which makes all connections fire together
#      LATENCY_COOKIES (users): the latency phase's wrk mode, as COOKIES. users:
#                         one wrk thread per connection, so the pauses are
#                         independent; fixed: one thread for all, whose event
#                         loop fires every pause due in the same millisecond
#                         together, bursts that p99 then measures (benches/HISTORY.md, round 11)
#      SCALE_SESSIONS (1000000)
#      LUA_RESTART (1)    1 = the Lua peer starts afresh before each round in which
#                         it runs, warmed in that round's order: its LuaJIT traces
#                         differ from one start to the next (the peer's NOTES.md),
#                         so the median samples several; 0 = one start
#      BUILD (1)          0 = use BIN as it is
#      BIN                default ${CARGO_TARGET_DIR:-target}/release/session-proxy
#      BARE, CORE         the pingora and pingora-core targets' binaries, default
#                         ${CARGO_TARGET_DIR:-target}/release/examples/bare_pingora
#                         and .../core_loop (each target skipped when absent)
#      COMPARE ("")       "NAME=/path/to/session-proxy ..." other builds to
#                         measure side by side (bypass, read, write)
#      COMPARE_STORE (memory) the store of the COMPARE builds
#      REDIS_URL (redis://127.0.0.1:6379) POSTGRES_URL (postgres://postgres@127.0.0.1:5432/test)
#      BENCH_RUN_DIR (/tmp/session-proxy-bench)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRK_DIR="$ROOT/benches/wrk"
RUN_DIR="${BENCH_RUN_DIR:-/tmp/session-proxy-bench}"
OUT_DIR="${1:-$RUN_DIR/results-$(date -u +%Y%m%dT%H%M%SZ)}"
DURATION=${DURATION:-8s}
CONNS=${CONNS:-32}
REPS=${REPS:-3}
WARMUP=${WARMUP:-2s}
QUIET_WAIT=${QUIET_WAIT:-60}
QUIET_PCT=${QUIET_PCT:-10}
COOKIES=${COOKIES:-users}
ONLY=${ONLY:-}
PHASES=${PHASES:-throughput latency scale}
DELAY_MS=${DELAY_MS:-auto}
LOAD_PCT=${LOAD_PCT:-25}
LATENCY_COOKIES=${LATENCY_COOKIES:-users}
SCALE_SESSIONS=${SCALE_SESSIONS:-1000000}
LUA_RESTART=${LUA_RESTART:-1}
BUILD=${BUILD:-1}
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/session-proxy}
BARE=${BARE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bare_pingora}
CORE=${CORE:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/core_loop}
COMPARE=${COMPARE:-}
COMPARE_STORE=${COMPARE_STORE:-memory}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
POSTGRES_URL=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
HZ=$(getconf CLK_TCK)
NGINX="$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)"
APACHE="$(command -v apache2 2>/dev/null || echo /usr/sbin/apache2)"
PYTHON="$(command -v python3)"
for mode in "$COOKIES" "$LATENCY_COOKIES"; do
    case $mode in users | fixed) ;; *) echo "COOKIES and LATENCY_COOKIES are users or fixed" >&2; exit 2 ;; esac
done

log() { printf '[bench] %s\n' "$*" >&2; }
for b in wrk taskset setsid curl "$NGINX" "$PYTHON"; do
    command -v "$b" >/dev/null || { echo "missing $b" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (wrk on 0, servers on 1)" >&2; exit 1; }
unset SESSION_PROXY_SECRET_KEYS
export RUST_LOG=${RUST_LOG:-warn}

if [ "$BUILD" = 1 ]; then
    log "building the release binary"
    (cd "$ROOT" && cargo build --release --quiet --bin session-proxy --example bare_pingora --example core_loop)
fi
[ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 1; }

mkdir -p "$RUN_DIR" "$OUT_DIR"
chmod 755 "$RUN_DIR"
rm -f "$RUN_DIR"/*.log "$RUN_DIR"/*.check   # the notes count this run's warnings only

# ---------- servers (each started here, pinned to CPU 1, stopped on exit) ----------
declare -A SRV_PID=() SRV_PORT=() SKIPPED=()
STARTED=()

stop_server() {  # NAME
    local name=$1 pid=${SRV_PID[$1]:-} i
    [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 0
    case $name in
        upstream | proxy | lua) kill -QUIT "$pid" 2>/dev/null || true ;;
        bare | core) kill -INT "$pid" 2>/dev/null || true ;;  # pingora's fast shutdown
        *) kill -TERM "$pid" 2>/dev/null || true ;;
    esac
    for ((i = 0; i < 100; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
}
stop_all() {
    local name
    for name in "${STARTED[@]}"; do stop_server "$name"; done
    STARTED=()
}
trap stop_all EXIT

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() {  # PORT PATH
    local i
    for ((i = 0; i < 150; i++)); do
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1$2" && return 0
        sleep 0.1
    done
    return 1
}
pid_from_file() {  # FILE: waits for it, prints the pid
    local i
    for ((i = 0; i < 50; i++)); do [ -s "$1" ] && break; sleep 0.1; done
    tr -dc '0-9' < "$1"
}
claim_port() {  # PORT NAME
    if port_busy "$1"; then echo "port 127.0.0.1:$1 ($2) is taken by something that is not ours" >&2; exit 1; fi
}

start_nginx() {  # NAME CONF PORT (CONF: a path, or a file of benches/wrk/)
    local name=$1 prefix="$RUN_DIR/$1/" conf=$2
    [[ $conf == /* ]] || conf="$WRK_DIR/$conf"
    claim_port "$3" "$name"
    mkdir -p "$prefix/tmp"
    rm -f "$prefix/nginx.pid"
    taskset -c 1 "$NGINX" -p "$prefix" -c "$conf" -e "${prefix}error.log"
    SRV_PID[$name]=$(pid_from_file "$prefix/nginx.pid")
    SRV_PORT[$name]=$3
    [[ " ${STARTED[*]} " == *" $name "* ]] || STARTED+=("$name")
    wait_http "$3" / || { echo "$name did not come up" >&2; exit 1; }
}

# shellcheck source=benches/peers.sh
. "$ROOT/benches/peers.sh"

start_apache() {
    local dir="$RUN_DIR/apache" peer
    peer=$(peer_dir apache-mod-session) || peer=""
    if [ ! -x "$APACHE" ] || [ ! -e /usr/lib/apache2/modules/mod_session_dbd.so ] ||
        ! ls /usr/lib/*/apr-util-1/apr_dbd_sqlite3*.so >/dev/null 2>&1; then
        # the peer's own installer (Debian packages, no service started)
        if [ -n "$peer" ]; then
            (. "$peer/env.sh" && peer_ensure_packages) || true
        fi
    fi
    if [ ! -x "$APACHE" ] || ! command -v sqlite3 >/dev/null; then
        SKIPPED[apache]="apache2 / sqlite3 not installed"
        return
    fi
    claim_port 18286 apache
    mkdir -p "$dir"
    rm -f "$dir"/sessions.db* "$dir/httpd.pid"
    sqlite3 "$dir/sessions.db" >/dev/null <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS session (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL, expiry INTEGER NOT NULL DEFAULT 0);
SQL
    chown -R www-data:www-data "$dir" 2>/dev/null || true
    chmod 755 "$dir"
    taskset -c 1 "$APACHE" -f "$WRK_DIR/httpd-session.conf" -C "Define BENCH_RUN_DIR $dir" -k start
    SRV_PID[apache]=$(pid_from_file "$dir/httpd.pid")
    SRV_PORT[apache]=18286
    STARTED+=(apache)
    wait_http 18286 /read/x || { echo "apache did not come up" >&2; tail "$dir/error.log" >&2; exit 1; }
}

# The nginx + Lua session peer: its session.lua, our conf (ports).
LUA_SECRET=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
start_lua() {
    local why
    if ! why=$(lua_peer_prepare "$RUN_DIR/lua" 18278 18280); then
        SKIPPED[lua]=$why
        return
    fi
    SESSION_PROXY_SECRET_KEYS=$LUA_SECRET start_nginx lua "$RUN_DIR/lua/nginx.conf" 18278
}

. "$ROOT/benches/proxy-toml.sh"
SECRET=$("$BIN" keygen)
# session-proxy with one store: NAME PORT KIND [ADMIN_PORT] [BINARY] [MAX_ENTRIES] [SESSION_LINES]
start_proxy() {
    local name=$1 port=$2 kind=$3 admin=${4:-} bin=${5:-$BIN} max=${6:-1000000} session=${7:-}
    local conf="$RUN_DIR/$name.toml" store
    case $kind in
        memory) store="max_entries = $max" ;;
        disk) rm -rf "$RUN_DIR/$name-sessions"; store="path = \"$RUN_DIR/$name-sessions\"" ;;
        redis) store="url = \"$REDIS_URL\"
key_prefix = \"bench-$$:\"" ;;
        postgres) store="url = \"$POSTGRES_URL\"
table = \"bench_sessions_$$\"" ;;
    esac
    proxy_toml "$port" 18280 "$SECRET" "$kind" "$store" "$admin" "$session" > "$conf"
    if ! "$bin" check -c "$conf" > "$RUN_DIR/$name.check" 2>&1; then
        SKIPPED[$name]="session-proxy check failed: $(tail -n1 "$RUN_DIR/$name.check")"
        log "skipping $name: ${SKIPPED[$name]}"
        return
    fi
    claim_port "$port" "$name"
    # A session of its own, as nginx and Apache have by daemonizing: with
    # the kernel's autogroups (sched_autogroup_enabled) each session is
    # one scheduling group, and the proxy would otherwise share this
    # script's. (Not a process-group leader here, setsid execs in place:
    # $! stays the proxy's pid.)
    taskset -c 1 setsid "$bin" run -c "$conf" > "$RUN_DIR/$name.log" 2>&1 &
    SRV_PID[$name]=$!
    SRV_PORT[$name]=$port
    STARTED+=("$name")
    wait_http "$port" /bypass/ || { echo "$name did not come up" >&2; tail "$RUN_DIR/$name.log" >&2; exit 1; }
}

# pingora with nothing of ours (examples/): the engine's own cost per request
start_baseline() {  # NAME BINARY PORT
    local name=$1 bin=$2 port=$3
    if [ ! -x "$bin" ]; then
        SKIPPED[$name]="no binary at $bin (cargo build --release --example $(basename "$bin"))"
        log "skipping $name: ${SKIPPED[$name]}"
        return
    fi
    claim_port "$port" "$name"
    taskset -c 1 setsid "$bin" "127.0.0.1:$port" 127.0.0.1:18280 > "$RUN_DIR/$name.log" 2>&1 &
    SRV_PID[$name]=$!
    SRV_PORT[$name]=$port
    STARTED+=("$name")
    wait_http "$port" /bypass/ || { echo "$name did not come up" >&2; tail "$RUN_DIR/$name.log" >&2; exit 1; }
}

with_children() {  # PID...: the pids plus their descendants (nginx/apache workers)
    local p c
    for p in "$@"; do
        echo "$p"
        for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do with_children "$c"; done
    done
}
jiffies_of() {  # utime+stime of the given pids
    local s=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && s=$((s + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12+$13}')))
    done
    echo "$s"
}
machine_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# Time the hypervisor gave to other guests: on a shared VM, the noise that
# foreign processes do not explain.
steal_jiffies() { awk '/^cpu /{print $9}' /proc/stat; }
busy_pct_1s() {
    local b0 t0 b1 t1
    read -r b0 t0 < <(machine_jiffies); sleep 1; read -r b1 t1 < <(machine_jiffies)
    echo $(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
}
wait_quiet() {  # echoes the last 1 s busy % seen
    local i pct=0
    for ((i = 0; i < QUIET_WAIT; i++)); do
        pct=$(busy_pct_1s)
        [ "$pct" -lt "$QUIET_PCT" ] && break
    done
    echo "$pct"
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
new_cookie() {  # PORT NAME: a fresh stored session's cookie value
    curl -s -D - -o /dev/null -H "Cookie: theme=dark" "http://127.0.0.1:$1/write/login" |
        sed -n "s/^[Ss]et-[Cc]ookie: $2=\([^;]*\).*/\1/p" | head -n1 | tr -d '\r'
}
to_us() {  # "123.45us" | "1.23ms" | "1.00s"
    awk -v v="$1" 'BEGIN{ n=v+0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n*1000; else if (v ~ /s$/) print n*1000000; else print n }'
}

# ---------- targets ----------
# name -> "server path cookie-name"
declare -A TARGET=(
    [upstream]="upstream /read/x session_id"
    [nginx]="proxy /read/x session_id"
    [pingora]="bare /bypass/x session_id"
    [pingora-core]="core /bypass/x session_id"
    [apache-read]="apache /read/x peersid"
    [apache-write]="apache /write/x peersid"
    [lua-bypass]="lua /bypass/x session_id"
    [lua-read]="lua /read/x session_id"
    [lua-write]="lua /write/x session_id"
    [bypass]="memory /bypass/x session_id"
    [read-memory]="memory /read/x session_id"
    [write-memory]="memory /write/x session_id"
    [read-disk]="disk /read/x session_id"
    [write-disk]="disk /write/x session_id"
    [read-redis]="redis /read/x session_id"
    [write-redis]="redis /write/x session_id"
    [read-postgres]="postgres /read/x session_id"
    [write-postgres]="postgres /write/x session_id"
)
ORDER=(upstream nginx pingora pingora-core apache-read apache-write lua-bypass lua-read lua-write
    bypass read-memory write-memory read-disk write-disk read-redis write-redis read-postgres write-postgres)

log "starting the servers (pinned to CPU 1)"
start_nginx upstream nginx-upstream.conf 18280
start_nginx proxy nginx-proxy.conf 18281
start_baseline bare "$BARE" 18289
start_baseline core "$CORE" 18279
start_apache
start_lua
start_proxy memory 18282 memory
start_proxy disk 18283 disk
start_proxy redis 18284 redis
start_proxy postgres 18285 postgres
port=18290
for entry in $COMPARE; do
    cname=${entry%%=*}
    start_proxy "cmp-$cname" "$port" "$COMPARE_STORE" "" "${entry#*=}"
    TARGET[bypass@$cname]="cmp-$cname /bypass/x session_id"
    TARGET[read@$cname]="cmp-$cname /read/x session_id"
    TARGET[write@$cname]="cmp-$cname /write/x session_id"
    ORDER+=("bypass@$cname" "read@$cname" "write@$cname")
    port=$((port + 1))
done

# every pid of our servers, for the foreign CPU
ours() {
    local name
    OURS=""
    for name in "${STARTED[@]}"; do OURS="$OURS $(with_children "${SRV_PID[$name]}" | tr '\n' ' ')"; done
}
ours
for p in $OURS; do
    aff=$(taskset -pc "$p" | sed 's/.*: //')
    [ "$aff" = 1 ] || { echo "pid $p is not pinned to CPU 1 ($aff)" >&2; exit 1; }
done

RUN_TARGETS=()
for t in "${ORDER[@]}"; do
    read -r server _ _ <<<"${TARGET[$t]}"
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $t "* ]]; then continue; fi
    if [ -z "${SRV_PID[$server]:-}" ]; then
        SKIPPED[$t]="${SKIPPED[$server]:-server $server not started}"
        continue
    fi
    RUN_TARGETS+=("$t")
done

# a fixed session per target (COOKIES=fixed, and the fallback of the
# upstream and nginx targets, which never set a cookie)
declare -A FIXED=()
fixed_cookies() {  # TARGET...
    local t server path cname
    for t in "$@"; do
        read -r server path cname <<<"${TARGET[$t]}"
        case $server in upstream | proxy | bare | core) continue ;; esac
        FIXED[$t]=$(new_cookie "${SRV_PORT[$server]}" "$cname")
        [ -n "${FIXED[$t]}" ] || { echo "$t: no session cookie from /write/login" >&2; exit 1; }
    done
}
fixed_cookies "${RUN_TARGETS[@]}"
FALLBACK=$(new_cookie 18282 session_id)

# smoke test: the read path resolves the session (no Set-Cookie), the
# write path hides the upstream's update and keeps the cookie
if [ -n "${SRV_PID[memory]:-}" ]; then
    c=$(new_cookie 18282 session_id)
    h=$(curl -s -D - -o /dev/null -H "Cookie: session_id=$c" http://127.0.0.1:18282/read/x)
    echo "$h" | grep -qi '^set-cookie' && { echo "read path sets a cookie: the session did not resolve" >&2; exit 1; }
    h=$(curl -s -D - -o /dev/null -H "Cookie: session_id=$c" http://127.0.0.1:18282/write/x)
    echo "$h" | grep -qi '^x-session-update\|^set-cookie' && { echo "write path leaks the update or re-sets the cookie" >&2; exit 1; }
fi

RAW="$OUT_DIR/raw.tsv"
printf 'phase\trep\ttarget\trps\tp50_us\tp99_us\trequests\terrors\tpre_busy_pct\tforeign_pct\tsrv_cpu_us_per_req\tupstream_cpu_us_per_req\tsteal_pct\n' > "$RAW"

wrk_args() {  # TARGET [DELAY_MS]: prints the env + wrk command line, one word a line
    local t=$1 delay=${2:-} server path cname cookie mode=$COOKIES
    read -r server path cname <<<"${TARGET[$t]}"
    cookie=${FIXED[$t]:-$FALLBACK}
    printf '%s\n' env "COOKIE_NAME=$cname" "COOKIE=$cookie" "LOGIN_PATH=/write/login"
    if [ -n "$delay" ]; then
        printf '%s\n' "DELAY_MS=$delay"
        mode=$LATENCY_COOKIES
    fi
    if [ "$mode" = users ]; then
        printf '%s\n' wrk -t"$CONNS" -c"$CONNS" -s "$WRK_DIR/session.lua"
    else
        printf '%s\n' wrk -t1 -c"$CONNS" -s "$WRK_DIR/fixed.lua"
    fi
    printf '%s\n' --latency --timeout 5s "http://127.0.0.1:${SRV_PORT[$server]}$path"
}

run_wrk() {  # PHASE REP TARGET [DELAY_MS]
    local phase=$1 rep=$2 t=$3 delay=${4:-} out="$OUT_DIR/wrk-$1-$2-$3.txt" server
    local pre b0 t0 b1 t1 o0 o1 s0 s1 u0 u1 st0 st1 w nreq spids upids cmd
    read -r server _ _ <<<"${TARGET[$t]}"
    spids=$(with_children "${SRV_PID[$server]}" | tr '\n' ' ')
    upids=$(with_children "${SRV_PID[upstream]}" | tr '\n' ' ')
    mapfile -t cmd < <(wrk_args "$t" "$delay")
    pre=$(wait_quiet)
    read -r b0 t0 < <(machine_jiffies); o0=$(jiffies_of $OURS); s0=$(jiffies_of $spids); u0=$(jiffies_of $upids); st0=$(steal_jiffies)
    taskset -c 0 /usr/bin/time -f '%U %S' -o "$out.cpu" "${cmd[@]:0:${#cmd[@]}-1}" -d"$DURATION" "${cmd[-1]}" > "$out" 2>&1 || true
    read -r b1 t1 < <(machine_jiffies); o1=$(jiffies_of $OURS); s1=$(jiffies_of $spids); u1=$(jiffies_of $upids); st1=$(steal_jiffies)
    nreq=$(awk '/requests in/{print $1}' "$out")
    [ -n "$nreq" ] && [ "$nreq" -gt 0 ] || { log "$t: wrk failed: $(tail -n3 "$out" | tr '\n' ' ')"; return; }
    local srv_us up_us foreign rps p50 p99 errs
    srv_us=$(awk -v j=$((s1 - s0)) -v hz="$HZ" -v n="$nreq" 'BEGIN{printf "%.1f", j*1e6/hz/n}')
    up_us=$(awk -v j=$((u1 - u0)) -v hz="$HZ" -v n="$nreq" 'BEGIN{printf "%.1f", j*1e6/hz/n}')
    w=$(awk -v hz="$HZ" '{printf "%d", ($1+$2)*hz}' "$out.cpu" 2>/dev/null || echo 0)
    foreign=$((((b1 - b0) - (o1 - o0) - w) * 100 / (t1 - t0)))
    [ "$foreign" -lt 0 ] && foreign=0
    rps=$(awk '/^Requests\/sec:/{print $2}' "$out")
    p50=$(to_us "$(awk '$1=="50%"{print $2}' "$out")")
    p99=$(to_us "$(awk '$1=="99%"{print $2}' "$out")")
    errs=$(awk '/Non-2xx|Socket errors/{printf "%s ", $0}' "$out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$rep" "$t" "$rps" "$p50" "$p99" "$nreq" \
        "${errs:-0}" "$pre" "$foreign" "$srv_us" "$up_us" "$(((st1 - st0) * 100 / (t1 - t0)))" | tee -a "$RAW" >&2
}

warm_up() {  # PHASE DELAY_MS TARGET...: a WARMUP-long run of each, not recorded
    local phase=$1 delay=$2 t cmd
    shift 2
    for t in "$@"; do
        mapfile -t cmd < <(wrk_args "$t" "$delay")
        taskset -c 0 "${cmd[@]:0:${#cmd[@]}-1}" -d"$WARMUP" "${cmd[-1]}" > "$OUT_DIR/warmup-$phase-$t.txt" 2>&1 || true
    done
}

# The Lua peer afresh, warmed on its targets of this round in its order.
restart_lua() {  # PHASE DELAY_MS TARGET...
    local phase=$1 delay=$2 t mine=()
    shift 2
    for t in "$@"; do [[ $t == lua-* ]] && mine+=("$t"); done
    [ "${#mine[@]}" -gt 0 ] || return 0
    stop_server lua
    SESSION_PROXY_SECRET_KEYS=$LUA_SECRET start_nginx lua "$RUN_DIR/lua/nginx.conf" 18278
    ours
    log "lua peer started afresh (pid ${SRV_PID[lua]}), warming ${mine[*]}"
    fixed_cookies "${mine[@]}"
    warm_up "$phase" "$delay" "${mine[@]}"
}

rounds() {  # PHASE DELAY_MS TARGET...: REPS interleaved rounds, rotated start
    local phase=$1 delay=$2 rep k n order
    shift 2
    local targets=("$@")
    n=${#targets[@]}
    [ "$n" -gt 0 ] || return 0
    warm_up "$phase" "$delay" "${targets[@]}"
    for rep in $(seq 1 "$REPS"); do
        order=()
        for k in $(seq 0 $((n - 1))); do order+=("${targets[$(((k + rep - 1) % n))]}"); done
        if [ "$rep" -gt 1 ] && [ "$LUA_RESTART" = 1 ]; then restart_lua "$phase" "$delay" "${order[@]}"; fi
        for t in "${order[@]}"; do run_wrk "$phase" "$rep" "$t" "$delay"; done
    done
}

{
    echo "# $(date -u +%FT%TZ) $(uname -r) nproc=$(nproc) $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
    echo "# $("$NGINX" -v 2>&1); $("$APACHE" -v 2>/dev/null | head -n1); $(wrk -v 2>&1 | head -n1)"
    echo "# binary: $BIN ($(stat -c %y "$BIN"))"
    echo "# wrk on CPU 0, servers on CPU 1; -c$CONNS -d$DURATION; reps=$REPS; cookies=$COOKIES; phases: $PHASES (latency: $LATENCY_COOKIES, DELAY_MS=$DELAY_MS, DELAY_DIST=${DELAY_DIST:-exp})"
} | tee "$OUT_DIR/machine.txt" >&2

if [[ " $PHASES " == *" throughput "* ]]; then
    log "phase throughput: ${RUN_TARGETS[*]}"
    rounds throughput "" "${RUN_TARGETS[@]}"
fi

if [[ " $PHASES " == *" latency "* ]]; then
    LAT=()
    for t in nginx bypass read-memory write-memory write-disk; do
        [[ " ${RUN_TARGETS[*]} " == *" $t "* ]] && LAT+=("$t")
    done
    if [ "$DELAY_MS" = auto ]; then
        capacity=$(awk -F'\t' '$1 == "throughput" && $3 == "bypass" {print $4}' "$RAW" | sort -n |
            awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}')
        if [ -z "$capacity" ]; then
            mapfile -t cmd < <(wrk_args bypass)
            capacity=$(taskset -c 0 "${cmd[@]:0:${#cmd[@]}-1}" -d"$WARMUP" "${cmd[-1]}" | awk '/^Requests\/sec:/{print $2}')
        fi
        DELAY_MS=$(awk -v c="$CONNS" -v r="${capacity:-0}" -v p="$LOAD_PCT" 'BEGIN{d = r > 0 ? c * 1000 / (r * p / 100) : 4; printf "%d", d < 1 ? 1 : d + 0.5}')
        log "latency: bypass capacity ${capacity:-unknown} req/s, $LOAD_PCT % of it offered: DELAY_MS=$DELAY_MS"
        echo "# latency phase: DELAY_MS=$DELAY_MS ($LOAD_PCT % of bypass's ${capacity:-unknown} req/s)" >> "$OUT_DIR/machine.txt"
    fi
    log "phase latency (DELAY_MS=$DELAY_MS per connection): ${LAT[*]}"
    rounds latency "$DELAY_MS" "${LAT[@]}"
fi

SCALE_TSV="$OUT_DIR/scale.tsv"
if [[ " $PHASES " == *" scale "* ]]; then
    log "phase scale: prefilling 1000 and $SCALE_SESSIONS sessions"
    # No touches in either: with the default touch_interval (60 s), every
    # first read of a session prefilled more than 60 s earlier also writes
    # its access time. The 10^6 prefill takes longer than that and its
    # sessions are read at random, mostly for the first time, so about half
    # the 10^6 side's reads were read + touch, against ~1 % of the 10^3
    # side's (whose 1 000 sessions are all touched in the warm-up): the
    # ratio measured the touches, not the store's size.
    start_proxy scale-1e3 18287 memory 18297 "$BIN" $((SCALE_SESSIONS + 100000)) "touch_interval = 3600"
    start_proxy scale-big 18288 memory 18298 "$BIN" $((SCALE_SESSIONS + 100000)) "touch_interval = 3600"
    for name in scale-1e3 scale-big; do OURS="$OURS ${SRV_PID[$name]}"; done
    printf 'proxy\tsessions_created\trss_kb_before\trss_kb_after_prefill\trss_kb_end\tprefill_s\n' > "$SCALE_TSV"
    declare -A RSS0=() CREATED=() PREFILL_S=()
    for name in scale-1e3 scale-big; do
        count=1000
        [ "$name" = scale-big ] && count=$SCALE_SESSIONS
        RSS0[$name]=$(rss_kb "${SRV_PID[$name]}")
        file="$RUN_DIR/$name.cookies"
        rm -f "$file"
        started=$(date +%s)
        COUNT=$count COOKIES_OUT="$file" taskset -c 0 wrk -t1 -c"$CONNS" -d3600s --timeout 5s \
            -s "$WRK_DIR/prefill.lua" "http://127.0.0.1:${SRV_PORT[$name]}/write/prefill" > "$OUT_DIR/prefill-$name.txt" 2>&1 &
        wpid=$!
        while [ -d "/proc/$wpid" ] && [ "$(cat "$file" 2>/dev/null | wc -l)" -lt "$count" ]; do sleep 0.5; done
        kill -INT "$wpid" 2>/dev/null || true
        wait "$wpid" || true
        PREFILL_S[$name]=$(($(date +%s) - started))
        sleep 1
        CREATED[$name]=$(curl -s "http://127.0.0.1:$((SRV_PORT[$name] + 10))/metrics" |
            awk '/^session_proxy_sessions_created_total/{print $2}')
        log "$name: $(wc -l < "$file") cookies, ${CREATED[$name]} sessions created in ${PREFILL_S[$name]} s, RSS $(rss_kb "${SRV_PID[$name]}") kB"
        TARGET[scale-read-$name]="$name /read/x session_id"
    done
    RSS1_1e3=$(rss_kb "${SRV_PID[scale-1e3]}"); RSS1_big=$(rss_kb "${SRV_PID[scale-big]}")
    # scale.lua draws a random stored session for every request (wrk -t1)
    scale_args() {
        local name=${1#scale-read-}
        printf '%s\n' env "COOKIES=$RUN_DIR/$name.cookies" wrk -t1 -c"$CONNS" -s "$WRK_DIR/scale.lua" \
            --latency --timeout 5s "http://127.0.0.1:${SRV_PORT[$name]}/read/x"
    }
    SCALE_T=(scale-read-scale-1e3 scale-read-scale-big)
    for t in "${SCALE_T[@]}"; do
        mapfile -t cmd < <(scale_args "$t")
        taskset -c 0 "${cmd[@]:0:${#cmd[@]}-1}" -d"$WARMUP" "${cmd[-1]}" > "$OUT_DIR/warmup-scale-$t.txt" 2>&1 || true
    done
    wrk_args() { scale_args "$1"; }
    for rep in $(seq 1 "$REPS"); do
        order=("${SCALE_T[@]}")
        [ $((rep % 2)) = 0 ] && order=("${SCALE_T[1]}" "${SCALE_T[0]}")
        for t in "${order[@]}"; do run_wrk scale "$rep" "$t"; done
    done
    printf 'scale-1e3\t%s\t%s\t%s\t%s\t%s\n' "${CREATED[scale-1e3]}" "${RSS0[scale-1e3]}" "$RSS1_1e3" \
        "$(rss_kb "${SRV_PID[scale-1e3]}")" "${PREFILL_S[scale-1e3]}" >> "$SCALE_TSV"
    printf 'scale-big\t%s\t%s\t%s\t%s\t%s\n' "${CREATED[scale-big]}" "${RSS0[scale-big]}" "$RSS1_big" \
        "$(rss_kb "${SRV_PID[scale-big]}")" "${PREFILL_S[scale-big]}" >> "$SCALE_TSV"
fi

: > "$OUT_DIR/skipped.txt"
for k in "${!SKIPPED[@]}"; do echo "$k: ${SKIPPED[$k]}" >> "$OUT_DIR/skipped.txt"; done
# Apache's sessions table: one row per session it created (a write renames
# its row to the new id, an UPDATE, so rows do not grow with writes)
if [ -n "${SRV_PID[apache]:-}" ]; then
    echo "apache sessions rows: $(sqlite3 "$RUN_DIR/apache/sessions.db" 'select count(*) from session' 2>/dev/null)" >> "$OUT_DIR/skipped.txt"
fi
echo "proxy log lines at WARN/ERROR: $(cat "$RUN_DIR"/*.log 2>/dev/null | grep -c ' WARN \| ERROR ' || true)" >> "$OUT_DIR/skipped.txt"

# ---------- medians, ratios, targets ----------
"$PYTHON" - "$OUT_DIR" <<'PY' | tee "$OUT_DIR/summary.md"
import csv, os, statistics as st, sys
out_dir = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out_dir, "raw.tsv")), delimiter="\t"))

def medians(phase):
    by = {}
    for r in rows:
        if r["phase"] == phase:
            by.setdefault(r["target"], []).append(r)
    med = {}
    for t, rs in by.items():
        rps = [float(r["rps"]) for r in rs]
        med[t] = dict(rps=st.median(rps), lo=min(rps), hi=max(rps), n=len(rs),
                      p50=st.median(float(r["p50_us"]) for r in rs),
                      p99=st.median(float(r["p99_us"]) for r in rs),
                      srv=st.median(float(r["srv_cpu_us_per_req"]) for r in rs),
                      up=st.median(float(r["upstream_cpu_us_per_req"]) for r in rs),
                      errs="; ".join(sorted({r["errors"].strip() for r in rs if r["errors"].strip() not in ("", "0")})) or "none",
                      foreign=max(int(r["foreign_pct"]) for r in rs),
                      steal=max(int(r.get("steal_pct") or 0) for r in rs))
    return med

def table(med, order):
    out = ["| target | req/s median | min..max | p50 µs | p99 µs | server CPU µs/req | upstream CPU µs/req | errors | foreign CPU % max | steal % max |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for t in order:
        if t in med:
            m = med[t]
            out.append(f"| {t} | {m['rps']:.0f} | {m['lo']:.0f}..{m['hi']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['srv']:.1f} | {m['up']:.1f} | {m['errs']} | {m['foreign']} | {m['steal']} |")
    return out

def paired(phase, key, x, y, combine):
    """combine(x's value, y's value) for each round that ran both."""
    by_round = {}
    for r in rows:
        if r["phase"] == phase:
            by_round.setdefault(int(r["rep"]), {})[r["target"]] = float(r[key])
    return [combine(rr[x], rr[y]) for _, rr in sorted(by_round.items()) if x in rr and y in rr]

def median_or_none(values):
    return st.median(values) if values else None

def verdict(value, goal, higher=True, med=None, targets=()):
    # wrk counts non-2xx answers and timeouts as requests: a target that
    # failed requests may look fast, so no verdict on it.
    bad = [t for t in targets if med and med[t]["errs"] != "none"]
    if bad:
        return "**no verdict: errors in " + ", ".join(bad) + "**"
    ok = value >= goal if higher else value <= goal
    return "met" if ok else "**not met**"

order = ["upstream", "nginx", "pingora", "pingora-core", "apache-read", "apache-write", "lua-bypass", "lua-read", "lua-write",
         "bypass", "read-memory", "write-memory",
         "read-disk", "write-disk", "read-redis", "write-redis", "read-postgres", "write-postgres"]
lines = []
print(open(os.path.join(out_dir, "machine.txt")).read().rstrip())
med = medians("throughput")
if med:
    extra = sorted(t for t in med if t not in order)
    lines += ["", "### Throughput (as fast as it goes)", ""] + table(med, order + extra)
    # Per round: both targets ran back to back, so a round's ratio is the
    # least touched by the machine drifting between rounds; their median
    # is printed beside the ratio of medians. Best: the fastest run of
    # each; on a shared VM interference only ever slows a run down.
    def rounds_of(x, y):
        return " / ".join(f"{v:.2f}" for v in paired("throughput", "rps", x, y, lambda a, b: a / b))
    def median_of_rounds(x, y):
        m = median_or_none(paired("throughput", "rps", x, y, lambda a, b: a / b))
        return "–" if m is None else f"{m:.3f}"
    lines += ["", "| ratio (req/s of medians) | value | issue 5 target | | each round | median of the rounds | best run / best run |",
              "|---|---:|---:|---|---|---:|---:|"]
    for x, y, goal in (("read-memory", "bypass", 0.95), ("write-memory", "bypass", 0.85),
                       ("write-disk", "bypass", 0.70), ("write-redis", "bypass", 0.60),
                       ("bypass", "nginx", 1.0), ("write-memory", "apache-write", 3.0),
                       ("write-disk", "apache-write", 3.0)):
        if x in med and y in med:
            v = med[x]["rps"] / med[y]["rps"]
            best = med[x]["hi"] / med[y]["hi"]
            lines.append(f"| {x} / {y} | {v:.3f} | >= {goal} | {verdict(v, goal, med=med, targets=(x, y))} | {rounds_of(x, y)} | {median_of_rounds(x, y)} | {best:.3f} |")
    for x, y in (("read-disk", "bypass"), ("read-redis", "bypass"), ("read-postgres", "bypass"),
                 ("write-postgres", "bypass"), ("read-memory", "nginx"), ("read-memory", "apache-read"),
                 ("nginx", "upstream"), ("bypass", "upstream"),
                 ("pingora", "nginx"), ("bypass", "pingora"),
                 ("pingora-core", "nginx"), ("pingora-core", "pingora"),
                 ("lua-read", "lua-bypass"), ("lua-write", "lua-bypass"), ("lua-bypass", "nginx"),
                 ("bypass", "lua-bypass"), ("read-memory", "lua-read"), ("write-memory", "lua-write")):
        if x in med and y in med:
            best = med[x]["hi"] / med[y]["hi"]
            lines.append(f"| {x} / {y} | {med[x]['rps'] / med[y]['rps']:.3f} | | | {rounds_of(x, y)} | {median_of_rounds(x, y)} | {best:.3f} |")
    # COMPARE builds: each against the first one, path by path
    first = {}
    for t in extra:
        path, _, build = t.partition("@")
        first.setdefault(path, t)
        if first[path] != t:
            b = first[path]
            lines.append(f"| {t} / {b} | {med[t]['rps'] / med[b]['rps']:.3f} | | CPU µs/req {med[t]['srv']:.1f} vs {med[b]['srv']:.1f} |")
    for build in sorted({t.partition("@")[2] for t in extra}):
        b = med.get("bypass@" + build)
        for path in ("read", "write"):
            r = med.get(f"{path}@{build}")
            if r and b:
                lines.append(f"| {path}@{build} / bypass@{build} | {r['rps'] / b['rps']:.3f} | | |")
    lines += ["", "| CPU µs per request of the serving process | value |", "|---|---:|"]
    for x, y in (("bypass", "nginx"), ("pingora", "nginx"), ("bypass", "pingora"), ("pingora-core", "nginx"), ("read-memory", "bypass"), ("write-memory", "bypass"), ("write-disk", "bypass"),
                 ("lua-bypass", "nginx"), ("lua-read", "lua-bypass"), ("lua-write", "lua-bypass"), ("read-memory", "lua-read"), ("write-memory", "lua-write")):
        if x in med and y in med:
            lines.append(f"| {x} − {y} | {med[x]['srv'] - med[y]['srv']:+.1f} |")
lat = medians("latency")
if lat:
    lines += ["", "### Latency at one offered load (each connection pauses between requests)", ""]
    lines += table(lat, ["nginx", "bypass", "read-memory", "write-memory", "write-disk"])
    lines += ["", "| p99 added by the session work | µs | issue 5 target | | median of the rounds' differences |",
              "|---|---:|---:|---|---:|"]
    for x in ("read-memory", "write-memory", "write-disk"):
        if x in lat and "bypass" in lat:
            d = lat[x]["p99"] - lat["bypass"]["p99"]
            per_round = median_or_none(paired("latency", "p99_us", x, "bypass", lambda a, b: a - b))
            shown = "–" if per_round is None else f"{per_round:+.0f}"
            lines.append(f"| {x} − bypass | {d:+.0f} | <= 100 | {verdict(d, 100, higher=False, med=lat, targets=(x, 'bypass'))} | {shown} |")
sc = medians("scale")
scale_tsv = os.path.join(out_dir, "scale.tsv")
if sc and os.path.exists(scale_tsv):
    info = {r["proxy"]: r for r in csv.DictReader(open(scale_tsv), delimiter="\t")}
    lines += ["", "### Scale: memory store, random session per request", "",
              "| proxy | sessions created | RSS before MB | RSS after prefill MB | RSS at end MB | read req/s median | p50 µs | p99 µs | server CPU µs/req |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("scale-1e3", "scale-big"):
        m, i = sc.get("scale-read-" + name), info.get(name)
        if m and i:
            mb = lambda kb: f"{int(kb) / 1024:.0f}" if kb else "?"
            lines.append(f"| {name} | {i['sessions_created']} | {mb(i['rss_kb_before'])} | {mb(i['rss_kb_after_prefill'])} | {mb(i['rss_kb_end'])} | {m['rps']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['srv']:.1f} |")
    a, b = sc.get("scale-read-scale-1e3"), sc.get("scale-read-scale-big")
    if a and b and "scale-big" in info:
        v = b["rps"] / a["rps"]
        rss = int(info["scale-big"]["rss_kb_end"]) / 1024
        per_round = median_or_none(paired("scale", "rps", "scale-read-scale-big", "scale-read-scale-1e3", lambda a, b: a / b))
        lines += ["", "| scale | value | issue 5 target | |", "|---|---:|---:|---|",
                  f"| read req/s, big / 1e3 | {v:.3f} | >= 0.90 | {verdict(v, 0.90, med=sc, targets=('scale-read-scale-1e3', 'scale-read-scale-big'))} |",
                  f"| the same, median of the rounds' ratios | {'–' if per_round is None else f'{per_round:.3f}'} | | |",
                  f"| RSS with {info['scale-big']['sessions_created']} sessions | {rss:.0f} MB | < 512 MB | {verdict(rss, 512, higher=False)} |"]
skipped = open(os.path.join(out_dir, "skipped.txt")).read().strip()
if skipped:
    lines += ["", "Notes:", ""] + ["- " + l for l in skipped.splitlines()]
print("\n".join(lines))
PY
log "raw runs: $RAW; summary: $OUT_DIR/summary.md"
