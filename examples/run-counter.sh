#!/usr/bin/env bash
# Runs web.py's session counter (examples/counter.py, on 127.0.0.1:8000)
# behind session-proxy (config/session-proxy.toml, on 127.0.0.1:8080).
# Ctrl-C stops both.
#
# The proxy and the app share one secret through SESSION_PROXY_SECRET_KEYS.
# When it is not set, a fresh one is made for this run, so sessions from an
# earlier run no longer verify and simply start over.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release
proxy="${CARGO_TARGET_DIR:-target}/release/session-proxy"

if [[ -z "${SESSION_PROXY_SECRET_KEYS:-}" ]]; then
    SESSION_PROXY_SECRET_KEYS="$("$proxy" keygen)"
fi
export SESSION_PROXY_SECRET_KEYS

pids=()
stop() {
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

answers() { (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null; }
if answers; then
    echo "run-counter.sh: port 8000 is already in use; stop what listens there first" >&2
    exit 1
fi

python3 examples/counter.py --port 8000 &
pids+=("$!")
for _ in $(seq 100); do
    answers && break
    kill -0 "${pids[0]}" 2>/dev/null || { echo "run-counter.sh: examples/counter.py exited" >&2; exit 1; }
    sleep 0.1
done
answers || { echo "run-counter.sh: examples/counter.py does not answer on port 8000" >&2; exit 1; }

echo "Try: curl -c jar -b jar localhost:8080/count   (again for 2, 3; /reset starts over)"
# In the background and waited for, rather than exec'd, so that the traps
# above still run: a TERM sent to this script reaches the proxy too, and the
# app is stopped whichever way the proxy ends.
"$proxy" run -c config/session-proxy.toml &
pids+=("$!")
wait "${pids[1]}"
