#!/usr/bin/env bash
# A profile-guided (PGO) release build of session-proxy (issue 5): build it
# instrumented, run it through the wrk harness's load (bypassed path,
# session read and session write, on the memory and the disk store, in
# front of the harness's nginx upstream), then build it again with what
# that run measured. BENCHMARKS.md gives what it is worth.
#
#   benches/pgo.sh [OUT]        (default: target/pgo/session-proxy)
#
# Needs: nginx and wrk (as benches/run.sh), and the llvm-profdata of the
# LLVM that rustc is built on (`rustc -vV`; Debian: apt-get install llvm-N).
# The load is the harness's, not your app's. To train on your own traffic,
# run step 1's binary in front of your app instead of step 2, with
# LLVM_PROFILE_FILE=$PGO_DIR/profiles/proxy-%p.profraw, stop it with SIGTERM,
# and do steps 3 and 4 as below.
#
# env: TRAIN (5s) wrk duration per path and store;  PGO_DIR (/tmp/session-proxy-pgo)
#      PROFDATA (llvm-profdata-N, N = rustc's LLVM major version)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WRK_DIR="$ROOT/benches/wrk"
OUT=${1:-$ROOT/target/pgo/session-proxy}
TRAIN=${TRAIN:-5s}
WORK=${PGO_DIR:-/tmp/session-proxy-pgo}
UPSTREAM_PORT=18480
PROXY_PORT=18481

die() { echo "pgo: $*" >&2; exit 1; }

HOST=$(rustc -vV | sed -n 's/^host: //p')
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
PROFDATA=${PROFDATA:-$(command -v "llvm-profdata-$LLVM" || command -v llvm-profdata || true)}
[ -n "$PROFDATA" ] || die "no llvm-profdata; rustc uses LLVM $LLVM (Debian: apt-get install llvm-$LLVM)"
"$PROFDATA" --version | grep -q "version $LLVM\." ||
    die "$PROFDATA is not LLVM $LLVM's, whose profiles rustc writes (set PROFDATA)"
for tool in nginx wrk curl; do command -v "$tool" >/dev/null || die "$tool is needed"; done

rm -rf "$WORK/profiles"
mkdir -p "$WORK/profiles" "$WORK/upstream/tmp"
# --target: RUSTFLAGS then reach the proxy and its crates, not build scripts.
build() {  # TARGET_DIR RUSTFLAGS
    (cd "$ROOT" && RUSTFLAGS="$2" CARGO_TARGET_DIR="$1" cargo build --release --target "$HOST")
}

echo "pgo: 1/4 instrumented build" >&2
build "$WORK/target-generate" "-Cprofile-generate=$WORK/build-profiles"
instrumented="$WORK/target-generate/$HOST/release/session-proxy"

echo "pgo: 2/4 training run ($TRAIN per path and store)" >&2
sed "s/127.0.0.1:18280/127.0.0.1:$UPSTREAM_PORT/" "$WRK_DIR/nginx-upstream.conf" > "$WORK/upstream.conf"
nginx -p "$WORK/upstream/" -c "$WORK/upstream.conf" -e "$WORK/upstream/error.log"
proxy=
cleanup() {
    [ -n "$proxy" ] && kill "$proxy" 2>/dev/null
    nginx -p "$WORK/upstream/" -c "$WORK/upstream.conf" -e "$WORK/upstream/error.log" -s stop 2>/dev/null || true
}
trap cleanup EXIT
. "$ROOT/benches/proxy-toml.sh"
secret=$("$instrumented" keygen)
for store in memory disk; do
    case $store in
        memory) settings='max_entries = 100000' ;;
        disk) rm -rf "$WORK/sessions"; settings="path = \"$WORK/sessions\"" ;;
    esac
    proxy_toml "$PROXY_PORT" "$UPSTREAM_PORT" "$secret" "$store" "$settings" > "$WORK/$store.toml"
    # One profile per process (%p): two runs never write into one file.
    LLVM_PROFILE_FILE="$WORK/profiles/proxy-%p.profraw" \
        "$instrumented" run -c "$WORK/$store.toml" > "$WORK/$store.log" 2>&1 &
    proxy=$!
    for _ in $(seq 50); do
        curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/bypass/" && break
        sleep 0.1
    done
    for path in /bypass/x /read/x /write/x; do
        wrk -t8 -c8 -d"$TRAIN" -s "$WRK_DIR/session.lua" "http://127.0.0.1:$PROXY_PORT$path" |
            sed -n "s|^Requests/sec:|pgo:   $store $path req/s:|p" >&2
    done
    # A clean exit writes the profile.
    kill -TERM "$proxy"
    wait "$proxy" || true
    proxy=
done
ls "$WORK"/profiles/proxy-*.profraw >/dev/null 2>&1 || die "the training run wrote no profile"

echo "pgo: 3/4 merging the profiles" >&2
"$PROFDATA" merge -o "$WORK/merged.profdata" "$WORK"/profiles/proxy-*.profraw

echo "pgo: 4/4 optimized build" >&2
build "$WORK/target-use" "-Cprofile-use=$WORK/merged.profdata"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/target-use/$HOST/release/session-proxy" "$OUT"
echo "pgo: built $OUT" >&2
