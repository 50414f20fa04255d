#!/usr/bin/env bash
# What a client sees while the proxy is replaced under load: wrk (16
# connections, one session each, the disk store's write path) for 14 s,
# and at 4 s either a restart (SIGTERM, then a new process binds) or an
# upgrade (`run --upgrade`, then SIGQUIT to the old one). Prints wrk's
# totals: its socket errors are the requests that failed.
#
#   benches/upgrade.sh restart|upgrade [BIN]   (BIN: target/release/session-proxy)
# Needs nginx (the upstream) and wrk. Ports 19080-19082.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=${1:?restart or upgrade}
BIN=${2:-${CARGO_TARGET_DIR:-$ROOT/target}/release/session-proxy}
DIR=$(mktemp -d /tmp/session-proxy-upgrade.XXXXXX)
mkdir -p "$DIR/upstream/tmp" "$DIR/run"
chmod 700 "$DIR/run"
sed 's/18280/19080/' "$ROOT/benches/wrk/nginx-upstream.conf" > "$DIR/upstream/nginx.conf"
nginx -p "$DIR/upstream/" -c "$DIR/upstream/nginx.conf"
cat > "$DIR/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:19081"
admin_listen = "127.0.0.1:19082"
threads = 1
grace_period = 5
upgrade_sock = "$DIR/run/upgrade.sock"
[upstream]
addresses = ["127.0.0.1:19080"]
[session]
secret_keys = ["bench-upgrade-key-0123456789abcdef0123"]
[store]
path = "$DIR/sessions"
TOML
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    nginx -p "$DIR/upstream/" -c "$DIR/upstream/nginx.conf" -s stop 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"$BIN" run -c "$DIR/proxy.toml" 2> "$DIR/old.log" & old=$!; pids+=("$old")
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:19082/healthz && break; sleep 0.1; done
wrk -t4 -c16 -d14s -s "$ROOT/benches/wrk/session.lua" http://127.0.0.1:19081/write/x > "$DIR/wrk.txt" & load=$!
sleep 4
if [ "$MODE" = restart ]; then
    kill -TERM "$old"; wait "$old" || true
    "$BIN" run -c "$DIR/proxy.toml" 2> "$DIR/new.log" & new=$!
else
    "$BIN" run --upgrade -c "$DIR/proxy.toml" 2> "$DIR/new.log" & new=$!
    for _ in $(seq 200); do [ -S "$DIR/run/upgrade.sock" ] && break; sleep 0.05; done
    kill -QUIT "$old"
fi
pids+=("$new")
wait "$load"
echo "$MODE: $(grep -E 'requests in|Socket errors|Non-2xx' "$DIR/wrk.txt" | tr -s ' ' | tr '\n' ';')"
grep -h ERROR "$DIR/old.log" "$DIR/new.log" || true
