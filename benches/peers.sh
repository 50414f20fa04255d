# shellcheck shell=bash
# The peers' working setups (../shared/peers/NAME/), for run.sh and ab.sh,
# which source this file with ROOT set to the repository.

# peer_dir NAME: prints the peer's folder, or fails if this machine has none.
peer_dir() {
    local peers
    for peers in "$ROOT/../shared/peers" "$ROOT/../../shared/peers" /work/shared/peers; do
        [ -f "$peers/$1/env.sh" ] && { echo "$peers/$1"; return 0; }
    done
    return 1
}

# lua_peer_prepare PREFIX PORT UPSTREAM_PORT: makes PREFIX an nginx prefix
# for the nginx + Lua session peer (PREFIX/nginx.conf from
# benches/wrk/nginx-lua-session.conf with these ports, PREFIX/lua the
# peer's folder with its session.lua), first installing the peer's Debian
# packages if they are missing. When it cannot, prints why and fails.
# Start it with  SESSION_PROXY_SECRET_KEYS=... nginx -p PREFIX/ -c PREFIX/nginx.conf.
lua_peer_prepare() {
    local prefix=$1 port=$2 upstream=$3 peer
    if ! peer=$(peer_dir nginx-lua-session); then
        echo "the nginx-lua-session peer is not on this machine"
        return 1
    fi
    if [ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || [ ! -e /usr/share/lua/5.1/resty/core.lua ]; then
        # shellcheck disable=SC1091
        (. "$peer/env.sh" && peer_ensure_packages) >&2 || true  # no service started
    fi
    if [ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so ]; then
        echo "libnginx-mod-http-lua is not installed"
        return 1
    fi
    mkdir -p "$prefix/tmp"
    ln -sfn "$peer" "$prefix/lua"
    sed -e "s/127.0.0.1:18278;/127.0.0.1:$port;/" -e "s/127.0.0.1:18280;/127.0.0.1:$upstream;/" \
        "$ROOT/benches/wrk/nginx-lua-session.conf" > "$prefix/nginx.conf"
}
