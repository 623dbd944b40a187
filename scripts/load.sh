#!/usr/bin/env bash
# Load test of POST /tools/execute with the audit trail on, measured in the same
# run as a bare axum handler (examples/bare_axum.rs), rounds interleaved.
# Prints the median req/s and p99 of each, and their ratio.
#
#   scripts/load.sh                      # defaults below
#   DURABILITY=process ROUNDS=5 scripts/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
DURABILITY=${DURABILITY:-full}
TOOL_BODY='{"tool_name":"get_service_status","arguments":{"service_name":"web-server"}}'

if ! command -v wrk >/dev/null; then
    echo "installing wrk (Debian package)" >&2
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get install -y wrk >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi

cargo build --release --quiet --bin proxi --example bare_axum

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

export PROXI_OPERATOR_TOKEN=load-operator-token-0123456789
export PROXI_AGENT_TOKEN=load-agent-token-0123456789
# The high-limit policy: the shipped 50/s rate limit would measure the limiter, not the gateway.
RUST_LOG=warn target/release/proxi serve --bind 127.0.0.1:0 --data-dir "$work/data" --policy policies/high_rate_limits.json --durability "$DURABILITY" 2>"$work/proxi.log" &
pids+=($!)
target/release/examples/bare_axum >"$work/bare.out" &
pids+=($!)
for _ in $(seq 1 100); do
    [ -s "$work/data/server.json" ] && grep -q listening "$work/bare.out" && break
    sleep 0.1
done
proxi_url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$work/data/server.json")
bare_url=$(sed -n 's/^listening on //p' "$work/bare.out")

cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$TOOL_BODY'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $PROXI_AGENT_TOKEN"
LUA

# Sanity check before measuring: the governed call must succeed.
curl -sf -H "Authorization: Bearer $PROXI_AGENT_TOKEN" -H 'Content-Type: application/json' \
    -d "$TOOL_BODY" "$proxi_url/tools/execute" >/dev/null

run() { # url label round
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/post.lua" "$1/tools/execute" >"$work/$2.$3"
    local rps p99
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/$2.$3")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' "$work/$2.$3")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' "$work/$2.$3")
    [ -z "$errors" ] || echo "  $2 round $3: $errors" >&2
    echo "$rps $p99" >>"$work/$2.results"
    printf '  round %s %-6s %10.0f req/s  p99 %7.2f ms\n' "$3" "$2" "$rps" "$p99"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS interleaved rounds, audit durability=$DURABILITY"
for round in $(seq 1 "$ROUNDS"); do
    run "$bare_url" bare "$round"
    run "$proxi_url" proxi "$round"
done

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
bare_rps=$(cut -d' ' -f1 "$work/bare.results" | median)
bare_p99=$(cut -d' ' -f2 "$work/bare.results" | median)
proxi_rps=$(cut -d' ' -f1 "$work/proxi.results" | median)
proxi_p99=$(cut -d' ' -f2 "$work/proxi.results" | median)
echo
printf 'median  bare axum handler     %10.0f req/s  p99 %7.2f ms\n' "$bare_rps" "$bare_p99"
printf 'median  proxi /tools/execute  %10.0f req/s  p99 %7.2f ms\n' "$proxi_rps" "$proxi_p99"
awk -v p="$proxi_rps" -v b="$bare_rps" 'BEGIN {printf "ratio   proxi/bare throughput  %.1f%% (target >= 55%%)\n", 100*p/b}'
records=$(target/release/proxi audit verify --data-dir "$work/data" | tail -1)
echo "audit: $records"
