# The config of a benchmarked session-proxy, for benches/run.sh and
# benches/pgo.sh (sourced): one thread, a bypassed prefix /bypass/, one store.
#   proxy_toml PORT UPSTREAM_PORT SECRET KIND STORE_SETTINGS [ADMIN_PORT] [SESSION_LINES] > FILE
# SESSION_LINES: more [session] settings, e.g. "touch_interval = 3600".
proxy_toml() {
    cat <<EOF_TOML
[server]
listen = "127.0.0.1:$1"
threads = 1
admin_listen = "${6:+127.0.0.1:$6}"
[upstream]
addresses = ["127.0.0.1:$2"]
[session]
secret_keys = ["$3"]
bypass = ["/bypass/"]
${7:-}
[store]
kind = "$4"
$5
EOF_TOML
}
