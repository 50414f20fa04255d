#!/usr/bin/env bash
# A long run that looks for leaks: memory, file descriptors, threads,
# upstream connections. The proxy (TLS, HTTP/2 and HTTP/1.1, memory store
# with a short timeout so sessions expire and are swept all along,
# lock = true, the access log rotated every ROTATE seconds) serves, all at
# once and for DURATION seconds:
#   - wrk over HTTPS, soak.lua: users who read, write, regenerate, kill,
#     post bodies, download 256 KiB, send forged cookies and get invalid
#     updates refused;
#   - h2load over HTTP/2, no cookie: a new session on every write;
#   - curl uploads over HTTP/2 and HTTP/1.1 cut off mid-body, and
#     downloads cut off mid-response.
# Every SAMPLE seconds it records the proxy's RSS, open descriptors,
# threads, its connections to the app and the counters of /metrics
# (samples.csv), and at the end compares the second half of the run with
# the first: a leak is growth that does not level off.
#
#   benches/soak.sh BIN [OUT_DIR]     (default /tmp/session-proxy-soak/<UTC time>)
#
# env: DURATION (1800) SAMPLE (10) ROTATE (60) TIMEOUT (20, the sessions'
#      idle timeout) WRK_CONNS (8) H2_CONNS (4) H2_STREAMS (8)
#      RATE (0 = as fast as it goes; else each wrk connection's mean pause
#      in ms between requests, as pace.lua)
# Ports: proxy 18580 (TLS), admin 18581, app 18582.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:?usage: soak.sh BIN [OUT_DIR]}"
OUT="${2:-/tmp/session-proxy-soak/$(date -u +%Y%m%dT%H%M%SZ)}"
DURATION=${DURATION:-1800}
SAMPLE=${SAMPLE:-10}
ROTATE=${ROTATE:-60}
TIMEOUT=${TIMEOUT:-20}
WRK_CONNS=${WRK_CONNS:-8}
H2_CONNS=${H2_CONNS:-4}
H2_STREAMS=${H2_STREAMS:-8}
RATE=${RATE:-0}
PROXY_PORT=18580 ADMIN_PORT=18581 APP_PORT=18582
URL="https://127.0.0.1:$PROXY_PORT"

for tool in nginx wrk h2load curl openssl; do
  command -v "$tool" >/dev/null || { echo "soak.sh: $tool is missing (apt-get install -y nginx wrk nghttp2-client curl openssl)" >&2; exit 1; }
done
mkdir -p "$OUT"/{upstream/tmp,file,logs}
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/stop"
pids=()
stop_loads() { # the loops see the stop file; their running wrk/h2load/curl are killed
  touch "$OUT/stop"
  for pid in "${pids[@]:1}"; do pkill -P "$pid" 2>/dev/null || true; done
}
cleanup() {
  stop_loads
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -f "$OUT/upstream/nginx.pid" ]; then kill "$(cat "$OUT/upstream/nginx.pid")" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
count_fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
trap cleanup EXIT

# The app.
head -c 262144 /dev/urandom >"$OUT/file/256k"
fill=$(printf 'x%.0s' $(seq 2400))
sed -e "s|@PORT@|$APP_PORT|" -e "s|@DIR@|$OUT|" -e "s|@FILL@|$fill|g" \
  "$ROOT/benches/wrk/nginx-soak.conf" >"$OUT/upstream/nginx.conf"
nginx -p "$OUT/upstream/" -c "$OUT/upstream/nginx.conf"

# The proxy.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
cat >"$OUT/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
threads = 2
tls_cert = "$OUT/cert.pem"
tls_key = "$OUT/key.pem"
access_log = "$OUT/logs/access.log"
body_timeout = 5

[upstream]
addresses = ["127.0.0.1:$APP_PORT"]

[session]
secret_keys = ["soak-key-0123456789abcdefghijklmnopqrstuvwxyz"]
secure = true
timeout = $TIMEOUT
touch_interval = $((TIMEOUT / 4))
lock = true
bypass = ["/bypass/"]

[store]
kind = "memory"
sweep_interval = 5
TOML
"$BIN" check -c "$OUT/proxy.toml"
"$BIN" run -c "$OUT/proxy.toml" 2>"$OUT/proxy.err" &
proxy=$!
pids+=("$proxy")
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$ADMIN_PORT/healthz" >/dev/null && break
  sleep 0.1
done

end=$((SECONDS + DURATION))
running() { [ $SECONDS -lt $end ] && [ ! -e "$OUT/stop" ] && kill -0 "$proxy" 2>/dev/null; }

# The loads, each looping until the end.
(
  if [ "$RATE" != 0 ]; then export DELAY_MS=$RATE; fi
  while running; do
    left=$((end - SECONDS)); [ $left -gt 60 ] && left=60
    [ $left -gt 0 ] || break
    wrk -t"$WRK_CONNS" -c"$WRK_CONNS" -d"${left}s" -s "$ROOT/benches/wrk/soak.lua" "$URL/" >>"$OUT/wrk.log" 2>&1 || true
  done
) &
pids+=($!)
(
  while running; do
    left=$((end - SECONDS)); [ $left -gt 60 ] && left=60
    [ $left -gt 0 ] || break
    h2load -D "$left" -c "$H2_CONNS" -m "$H2_STREAMS" \
      "$URL/read/h2" "$URL/write/h2" "$URL/bypass/h2" "$URL/file/256k" "$URL/regen/h2" >>"$OUT/h2load.log" 2>&1 || true
  done
) &
pids+=($!)
head -c 4194304 /dev/zero >"$OUT/upload"
(
  while running; do
    # Cut off mid-body (the upload is throttled) and mid-response.
    curl -sk --http2 --max-time 0.3 --limit-rate 200k -T "$OUT/upload" "$URL/write/up" -o /dev/null || true
    curl -sk --http1.1 --max-time 0.3 --limit-rate 200k -T "$OUT/upload" "$URL/write/up" -o /dev/null || true
    curl -sk --http2 --max-time 0.2 --limit-rate 50k "$URL/file/256k" -o /dev/null || true
    curl -sk --http1.1 --max-time 0.2 --limit-rate 50k "$URL/file/256k" -o /dev/null || true
  done
) &
pids+=($!)
(
  # logrotate's way: move the file, then SIGUSR1.
  n=0
  while running; do
    sleep "$ROTATE"
    n=$((n + 1))
    mv "$OUT/logs/access.log" "$OUT/logs/access.log.$n" 2>/dev/null || true
    kill -USR1 "$proxy" 2>/dev/null || true
    sleep 1
    [ $n -gt 2 ] && rm -f "$OUT/logs/access.log.$((n - 2))"
  done
) &
pids+=($!)

metric() { # NAME: the sum of every series of that counter
  awk -v name="$1" '$1 == name || index($1, name "{") == 1 { s += $2 } END { printf "%d", s }' "$OUT/metrics.txt"
}
echo "t,rss_kb,hwm_kb,fds,threads,app_conns,client_conns,requests,created,swept,expired,forged,invalid_updates,log_dropped" >"$OUT/samples.csv"
start=$SECONDS
# The last sample while the loads still run.
while [ $((SECONDS + SAMPLE)) -lt $end ] && running; do
  sleep "$SAMPLE"
  kill -0 "$proxy" 2>/dev/null || break
  curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" >"$OUT/metrics.txt" || true
  rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$proxy/status")
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$proxy/status")
  threads=$(awk '/^Threads/ { print $2 }' "/proc/$proxy/status")
  fds=$(count_fds "$proxy")
  app=$(ss -Htn state established "( dport = :$APP_PORT )" | wc -l)
  clients=$(ss -Htn state established "( sport = :$PROXY_PORT )" | wc -l)
  echo "$((SECONDS - start)),$rss,$hwm,$fds,$threads,$app,$clients,$(metric session_proxy_requests_total),$(metric session_proxy_sessions_created_total),$(metric session_proxy_sessions_swept_total),$(metric session_proxy_sessions_expired_total),$(metric session_proxy_forged_cookies_total),$(metric session_proxy_invalid_updates_total),$(metric session_proxy_access_log_dropped_total)" >>"$OUT/samples.csv"
done
kill -0 "$proxy" 2>/dev/null || { echo "soak.sh: the proxy died; see $OUT/proxy.err" >&2; exit 1; }

# After the load: idle for two session timeouts plus a sweep, so that every
# session has expired, and sample once more (the "idle" row).
stop_loads
sleep $((2 * TIMEOUT + 10))
rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$proxy/status")
fds=$(count_fds "$proxy")
threads=$(awk '/^Threads/ { print $2 }' "/proc/$proxy/status")
echo "idle,$rss,,$fds,$threads,$(ss -Htn state established "( dport = :$APP_PORT )" | wc -l),$(ss -Htn state established "( sport = :$PROXY_PORT )" | wc -l),,,,,,," >>"$OUT/samples.csv"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import csv, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(f"{out}/samples.csv")))
idle = [r for r in rows if r["t"] == "idle"]
rows = [r for r in rows if r["t"] != "idle"]
def col(name, rs): return [int(r[name]) for r in rs if r[name] != ""]
def slope(xs, ys):
    n = len(xs); mx = sum(xs) / n; my = sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
half = rows[len(rows) // 2:]
t = col("t", rows)
req = col("requests", rows)
print(f"# soak: {t[-1]} s, {req[-1]} requests ({req[-1] / t[-1]:.0f}/s), "
      f"{col('created', rows)[-1]} sessions created, {col('swept', rows)[-1]} swept\n")
print("| | first sample | middle | last | slope over the second half |")
print("|---|---|---|---|---|")
for name, unit, scale in [("rss_kb", "MB/h", 3600 / 1024), ("fds", "/h", 3600),
                          ("threads", "/h", 3600), ("app_conns", "/h", 3600)]:
    ys = col(name, rows)
    s = slope(col("t", half), col(name, half)) * scale
    print(f"| {name} | {ys[0]} | {ys[len(ys) // 2]} | {ys[-1]} | {s:+.2f} {unit} |")
if idle:
    i = idle[0]
    print(f"\nidle after the load (every session expired): rss_kb {i['rss_kb']}, fds {i['fds']}, "
          f"threads {i['threads']}, app_conns {i['app_conns']}, client_conns {i['client_conns']}")
import re
runs = re.findall(r"^soak: (\d+) responses as expected, (\d+) not", open(f"{out}/wrk.log").read(), re.M)
print(f"\nwrk (soak.lua): {len(runs)} runs, {sum(int(a) for a, _ in runs)} responses as expected, "
      f"{sum(int(b) for _, b in runs)} not")
h2 = re.findall(r"^requests: (\d+) total.*?(\d+) succeeded, (\d+) failed, (\d+) errored",
                open(f"{out}/h2load.log").read(), re.M)
print(f"h2load: {len(h2)} runs, {sum(int(r[1]) for r in h2)} succeeded, "
      f"{sum(int(r[2]) + int(r[3]) for r in h2)} failed or errored")
print("RSS by 5-minute window (kB): " + ", ".join(
    f"{w * 5}-{w * 5 + 5} min max {max(v)}" for w, v in sorted(
        {w: [int(r["rss_kb"]) for r in rows if int(r["t"]) // 300 == w]
         for w in {int(r["t"]) // 300 for r in rows}}.items())))
PY
