#!/usr/bin/env bash
# The cost of governing an upstream: MCP `tools/call` of an upstream's `echo`
# through Proxi, beside the same call made directly to the upstream, in one run,
# over the same transport (Streamable HTTP, one initialized session each), with the
# audit trail at full durability.
#
#   direct   POST upstream /mcp   tools/call echo
#   proxi    POST proxi    /mcp   tools/call fx__echo   (policy allows it; Proxi
#            reaches the same upstream process over Streamable HTTP)
#
# The upstream is examples/echo_upstream.rs (rmcp, release build) unless
# UPSTREAM=python picks the Python fixture (tests/fixtures/fixture_upstream.py),
# which saturates at a few hundred calls a second here, so that it, not Proxi,
# sets both figures.
#
# For each concurrency in CONNECTIONS, ROUNDS interleaved rounds (direct, proxi,
# direct, proxi, ...) of DURATION each; reports the median req/s, p50 and p99 of
# each path, the throughput ratio and the median added (targets from issue 10:
# ratio >= 0.70, added median <= 1 ms). One connection shows the latency Proxi
# adds to an unqueued call; more connections show throughput, where queueing
# behind the busier process inflates the added median.
#
# Settings (environment): CONNECTIONS ("1 4 32"), ROUNDS (3), DURATION (5s),
# THREADS (2, at most one per connection), DURABILITY (full), UPSTREAM (rust).
# wrk, the upstream and Proxi share the machine's cores. Needs wrk (installed from
# Debian if missing); UPSTREAM=python needs the Python venv of
# scripts/mcp-harness.sh (run first if missing).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
duration="${DURATION:-5s}"
connection_counts="${CONNECTIONS:-1 4 32}"
rounds="${ROUNDS:-3}"
threads="${THREADS:-2}"
durability="${DURABILITY:-full}"
upstream="${UPSTREAM:-rust}"
agent_token="bench-agent-token-0123456789"
operator_token="bench-operator-token-0123456789"
python="${PROXI_MCP_HARNESS:-$repo/target/mcp-harness}/venv/bin/python"

say() { printf '[bench-upstream] %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
    say "installing wrk (Debian package)"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
case "$upstream" in
    rust) ;;
    python)
        if [[ ! -x "$python" ]]; then
            say "installing the MCP Python SDK (scripts/mcp-harness.sh)"
            "$repo/scripts/mcp-harness.sh"
        fi
        ;;
    *) say "UPSTREAM must be rust or python, not $upstream"; exit 2 ;;
esac

say "building the release binaries"
(cd "$repo" && cargo build --release --quiet --bin proxi --example echo_upstream)

work="$(mktemp -d)"
fixture_pid=""
server_pid=""
cleanup() {
    for pid in "$server_pid" "$fixture_pid"; do
        if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

fixture_port="$(free_port)"
if [[ "$upstream" == rust ]]; then
    "$repo/target/release/examples/echo_upstream" --http --port "$fixture_port" >/dev/null 2>"$work/fixture.log" &
else
    "$python" "$repo/tests/fixtures/fixture_upstream.py" --http --port "$fixture_port" 2>"$work/fixture.log" &
fi
fixture_pid=$!
fixture_url="http://127.0.0.1:$fixture_port/mcp"

mcp_headers=(-H "Content-Type: application/json" -H "Accept: application/json, text/event-stream")
init_body='{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"wrk","version":"1"}}}'

# Opens one session at $1 (extra curl arguments follow) and prints its id.
open_session() {
    local url="$1"; shift
    local session
    session="$(curl -s -D - -o /dev/null "${mcp_headers[@]}" "$@" "$url" -d "$init_body" \
        | tr -d '\r' | sed -n 's/^mcp-session-id: //Ip')"
    [[ -n "$session" ]] || return 1
    curl -s -o /dev/null "${mcp_headers[@]}" "$@" -H "Mcp-Session-Id: $session" \
        -H "MCP-Protocol-Version: 2025-11-25" "$url" -d '{"jsonrpc":"2.0","method":"notifications/initialized"}'
    printf '%s' "$session"
}

direct_session=""
for _ in $(seq 1 600); do
    direct_session="$(open_session "$fixture_url" 2>/dev/null)" && break
    kill -0 "$fixture_pid" 2>/dev/null || { cat "$work/fixture.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n "$direct_session" ]] || { say "the fixture did not start"; cat "$work/fixture.log" >&2; exit 1; }
say "upstream ($upstream) at $fixture_url"

cat >"$work/policy.json" <<EOF
{
  "description": "bench-upstream: the upstream's echo, allowed in every mode, with rate limits no run reaches.",
  "default_mode": "NORMAL",
  "max_emergency_ttl_seconds": 3600,
  "rate_limits": [{"principal": "*", "tools": "*", "rate": "1000000/s", "burst": 1000000}],
  "upstreams": {"fx": {"url": "$fixture_url", "required": true}},
  "global_rules": {"always_blocked": []},
  "modes": {
    "NORMAL": {"allowed_tools": ["fx__echo"]},
    "EMERGENCY": {"allowed_tools": ["fx__echo"]}
  }
}
EOF
"$repo/target/release/proxi" policy check "$work/policy.json" >&2

PROXI_AGENT_TOKEN="$agent_token" PROXI_OPERATOR_TOKEN="$operator_token" RUST_LOG=warn \
    "$repo/target/release/proxi" serve --bind 127.0.0.1:0 --data-dir "$work/data" \
    --policy "$work/policy.json" --durability "$durability" 2>"$work/server.log" &
server_pid=$!
url=""
for _ in $(seq 1 600); do
    if [[ -f "$work/data/server.json" ]]; then
        url="$(sed -n 's/.*"url": *"\([^"]*\)".*/\1/p' "$work/data/server.json")"
        [[ -n "$url" ]] && break
    fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n "$url" ]] || { say "proxi did not start"; cat "$work/server.log" >&2; exit 1; }
proxi_session="$(open_session "$url/mcp" -H "Authorization: Bearer $agent_token")" \
    || { say "proxi's initialize gave no session id"; cat "$work/server.log" >&2; exit 1; }
say "proxi serve at $url (durability: $durability)"

call_body() { printf '{"jsonrpc":"2.0","id":"check","method":"tools/call","params":{"name":"%s","arguments":{"message":"ping"}}}' "$1"; }
# Sanity: each workload must succeed before it is timed.
check() { # name, url, session, tool, extra curl args...
    local name="$1" url="$2" session="$3" tool="$4"; shift 4
    local body
    body="$(curl -sf "${mcp_headers[@]}" "$@" -H "Mcp-Session-Id: $session" -H "MCP-Protocol-Version: 2025-11-25" \
        "$url" -d "$(call_body "$tool")")" || { say "$name: tools/call failed"; exit 1; }
    grep -Eq '"isError": ?false' <<<"$body" && grep -q '"ping"' <<<"$body" \
        || { say "$name: unexpected answer: $body"; cat "$work/server.log" >&2; exit 1; }
}
check direct "$fixture_url" "$direct_session" echo
check proxi "$url/mcp" "$proxi_session" fx__echo -H "Authorization: Bearer $agent_token"

# Request ids must be unique among a session's requests in flight: thread id + counter.
write_lua() { # file, session, tool, extra header line
    cat >"$1" <<EOF
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Mcp-Session-Id"] = "$2"
wrk.headers["MCP-Protocol-Version"] = "2025-11-25"
$4
function request()
    counter = counter + 1
    local body = string.format('{"jsonrpc":"2.0","id":"%d-%d","method":"tools/call","params":{"name":"$3","arguments":{"message":"ping"}}}', tid, counter)
    return wrk.format(nil, nil, nil, body)
end
EOF
}
write_lua "$work/direct.lua" "$direct_session" echo ""
write_lua "$work/proxi.lua" "$proxi_session" fx__echo "wrk.headers[\"Authorization\"] = \"Bearer $agent_token\""

# wrk prints latencies as 850.00us, 1.23ms or 1.20s; in milliseconds:
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }
median() { sort -n | awk '{a[NR]=$1} END {printf "%.3f", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

run() { # name, url, connections, round
    local out="$work/$1.$3.$4.out" wrk_threads=$(( threads < $3 ? threads : $3 ))
    wrk -t"$wrk_threads" -c"$3" -d"$duration" --latency -s "$work/$1.lua" "$2" >"$out"
    if grep -q "Non-2xx" "$out"; then cat "$out" >&2; say "$1: some responses were not 2xx"; exit 1; fi
    local rps p50 p99
    rps="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50="$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")"
    p99="$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")"
    echo "$rps $p50 $p99" >>"$work/$1.$3.results"
    say "c=$3 round $4 $1: $rps req/s, p50 $p50 ms, p99 $p99 ms"
}
say "$rounds interleaved rounds of $duration per concurrency ($connection_counts connections)"
for connections in $connection_counts; do
    for round in $(seq 1 "$rounds"); do
        run direct "$fixture_url" "$connections" "$round"
        run proxi "$url/mcp" "$connections" "$round"
    done
done

# Every call through Proxi is in the trail: the last record is one of them.
records="$(curl -sf -H "Authorization: Bearer $operator_token" "$url/audit?limit=1")" \
    || { say "cannot read the audit trail"; exit 1; }
grep -q 'fx__echo' <<<"$records" || { say "the audit trail does not show the calls: $records"; exit 1; }

printf '\nmedians of %s rounds of %s, upstream %s, durability %s\n' "$rounds" "$duration" "$upstream" "$durability"
printf '%5s  %12s %8s %8s  %12s %8s %8s  %6s %9s\n' conns "direct req/s" p50 p99 "proxi req/s" p50 p99 ratio "added p50"
for connections in $connection_counts; do
    declare -A figure=()
    for name in direct proxi; do
        figure[$name.rps]="$(cut -d' ' -f1 "$work/$name.$connections.results" | median)"
        figure[$name.p50]="$(cut -d' ' -f2 "$work/$name.$connections.results" | median)"
        figure[$name.p99]="$(cut -d' ' -f3 "$work/$name.$connections.results" | median)"
    done
    ratio="$(awk -v a="${figure[proxi.rps]}" -v b="${figure[direct.rps]}" 'BEGIN {printf "%.2f", a / b}')"
    added="$(awk -v a="${figure[proxi.p50]}" -v b="${figure[direct.p50]}" 'BEGIN {printf "%.3f", a - b}')"
    printf '%5s  %12.0f %8.3f %8.3f  %12.0f %8.3f %8.3f  %6s %9s\n' "$connections" \
        "${figure[direct.rps]}" "${figure[direct.p50]}" "${figure[direct.p99]}" \
        "${figure[proxi.rps]}" "${figure[proxi.p50]}" "${figure[proxi.p99]}" "$ratio" "$added"
done
# At full durability a governed upstream call waits for two fsyncs in turn (its
# intent before forwarding, its outcome before answering): their latency on the
# data dir's filesystem, in this run, is the floor of the added median.
fsync_p50="$(python3 - "$work/data" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
times = []
for n in range(200):
    os.pwrite(fd, b"x" * 4096, n * 4096)
    start = time.perf_counter()
    os.fdatasync(fd)
    times.append(time.perf_counter() - start)
os.close(fd)
os.unlink(path)
times.sort()
print("%.3f" % (times[len(times) // 2] * 1000))
PY
)"
printf '\ntargets: ratio proxi/direct >= 0.70, added p50 <= 1 ms (latencies in ms)\n'
printf 'fdatasync p50 on the data dir: %s ms (a call through proxi waits for two at full durability)\n' "$fsync_p50"
printf 'proxi %s, %s cores shared by wrk, the upstream and proxi\n' \
    "$("$repo/target/release/proxi" --version | awk '{print $2}')" "$(nproc)"
