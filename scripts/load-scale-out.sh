#!/usr/bin/env bash
# Load test of POST /tools/execute in one run, rounds interleaved, for:
#   sqlite  one instance, audit trail in SQLite (the default);
#   pg1     one instance on a PostgreSQL store;
#   pg3     three instances on the same PostgreSQL store, in aggregate
#           (three wrk processes at once, the connections split between them).
# Full durability everywhere (SQLite fsyncs its WAL; PostgreSQL commits with
# synchronous_commit on). Prints the median req/s and p99 of each, and the ratios.
# PostgreSQL is a throwaway cluster (initdb in a temp dir, loopback, free port).
#
#   scripts/load-scale-out.sh
#   DURATION=5s ROUNDS=3 CONNECTIONS=48 scripts/load-scale-out.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-48}
ROUNDS=${ROUNDS:-3}
TOOL_BODY='{"tool_name":"get_service_status","arguments":{"service_name":"web-server"}}'

if ! command -v wrk >/dev/null; then
    echo "installing wrk (Debian package)" >&2
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get install -y wrk >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi
scripts/postgres-harness.sh
pg_bin=$(cat target/postgres-harness/bin-dir)

cargo build --release --quiet --bin proxi

work=$(mktemp -d)
chmod 755 "$work"
pids=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres: "$work/pg"
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$pg_bin/initdb" -D "$work/pg/data" -U proxi --auth=trust -E UTF8 --locale=C >/dev/null
as_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $work/pg" \
    -l "$work/pg/server.log" -w start >/dev/null
as_pg "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U proxi proxi
store="postgres://proxi@127.0.0.1:$pg_port/proxi"

export PROXI_AGENT_TOKEN=load-agent-token-0123456789
operator_token=load-operator-token-0123456789
mkdir -p "$work/cred"
python3 -c 'import json,sys,os; print(json.dumps({"operator_token": sys.argv[1], "audit_key": os.urandom(32).hex()}))' \
    "$operator_token" >"$work/cred/operator.json"
chmod 600 "$work/cred/operator.json"

start() { # name [extra args...]; sets $started_url
    local name=$1
    shift
    RUST_LOG=warn target/release/proxi serve --bind 127.0.0.1:0 --data-dir "$work/$name" \
        --policy policies/high_rate_limits.json --durability full \
        --operator-credential "$work/cred/operator.json" "$@" >/dev/null 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 1 100); do
        [ -s "$work/$name/server.json" ] && break
        sleep 0.1
    done
    started_url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/$name/server.json")
}
start sqlite
sqlite_url=$started_url
pg_urls=()
for n in 1 2 3; do
    start "pg$n" --store "$store"
    pg_urls+=("$started_url")
done

cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$TOOL_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $PROXI_AGENT_TOKEN"
LUA
for url in "$sqlite_url" "${pg_urls[@]}"; do
    curl -sf -H "Authorization: Bearer $PROXI_AGENT_TOKEN" -H 'Content-Type: application/json' \
        -d "$TOOL_BODY" "$url/tools/execute" >/dev/null
done

wrk_run() { # url connections output
    wrk -t1 -c"$2" -d"$DURATION" --latency -s "$work/post.lua" "$1/tools/execute" >"$3"
    local errors
    errors=$(awk '/Non-2xx|Socket errors/ {print}' "$3")
    [ -z "$errors" ] || echo "  $3: $errors" >&2
}
rps_of() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
p99_of() { awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' "$1"; }

echo "wrk -c$CONNECTIONS -d$DURATION, $ROUNDS interleaved rounds, full durability"
for round in $(seq 1 "$ROUNDS"); do
    wrk_run "$sqlite_url" "$CONNECTIONS" "$work/sqlite.$round"
    echo "$(rps_of "$work/sqlite.$round") $(p99_of "$work/sqlite.$round")" >>"$work/sqlite.results"
    wrk_run "${pg_urls[0]}" "$CONNECTIONS" "$work/pg1.$round"
    echo "$(rps_of "$work/pg1.$round") $(p99_of "$work/pg1.$round")" >>"$work/pg1.results"
    share=$((CONNECTIONS / 3))
    wrk_pids=()
    for n in 0 1 2; do
        wrk_run "${pg_urls[$n]}" "$share" "$work/pg3.$round.$n" &
        wrk_pids+=($!)
    done
    wait "${wrk_pids[@]}"
    total=0
    worst=0
    for n in 0 1 2; do
        total=$(awk -v a="$total" -v b="$(rps_of "$work/pg3.$round.$n")" 'BEGIN {print a + b}')
        worst=$(awk -v a="$worst" -v b="$(p99_of "$work/pg3.$round.$n")" 'BEGIN {print (b > a ? b : a)}')
    done
    echo "$total $worst" >>"$work/pg3.results"
    printf '  round %s  sqlite %8.0f  pg1 %8.0f  pg3 %8.0f req/s\n' "$round" \
        "$(tail -1 "$work/sqlite.results" | cut -d' ' -f1)" "$(tail -1 "$work/pg1.results" | cut -d' ' -f1)" "$total"
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for name in sqlite pg1 pg3; do
    declare "${name}_rps=$(cut -d' ' -f1 "$work/$name.results" | median)"
    declare "${name}_p99=$(cut -d' ' -f2 "$work/$name.results" | median)"
done
echo
printf 'median  sqlite, 1 instance          %8.0f req/s  p99 %7.2f ms\n' "$sqlite_rps" "$sqlite_p99"
printf 'median  postgres, 1 instance        %8.0f req/s  p99 %7.2f ms\n' "$pg1_rps" "$pg1_p99"
printf 'median  postgres, 3 instances (sum) %8.0f req/s  p99 %7.2f ms (worst instance)\n' "$pg3_rps" "$pg3_p99"
awk -v s="$sqlite_rps" -v p="$pg1_rps" -v t="$pg3_rps" \
    'BEGIN {printf "ratios  pg1/sqlite %.2f   pg3/sqlite %.2f   pg3/pg1 %.2f\n", p / s, t / s, t / p}'
