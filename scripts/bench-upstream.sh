#!/usr/bin/env bash
# The cost of governing an upstream: MCP `tools/call` of the fixture upstream's
# `echo` (tests/fixtures/fixture_upstream.py) through Proxi, beside the same call
# made directly to the fixture, in one run, over the same transport (Streamable
# HTTP, one initialized session each), with the audit trail at full durability.
#
#   direct   POST fixture /mcp   tools/call echo
#   proxi    POST proxi   /mcp   tools/call fx__echo   (policy allows it; Proxi
#            reaches the same fixture process over Streamable HTTP)
#
# Reports req/s, p50 and p99 for both, the throughput ratio and the median added
# (targets from issue 10: ratio >= 0.70, added median <= 1 ms).
#
# Settings (environment): DURATION (10s), CONNECTIONS (4), THREADS (2),
# DURABILITY (full). wrk, the fixture and Proxi share the machine's cores.
# Needs wrk (installed from Debian if missing), and the Python venv of
# scripts/mcp-harness.sh (run first if missing).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
duration="${DURATION:-10s}"
connections="${CONNECTIONS:-4}"
threads="${THREADS:-2}"
durability="${DURABILITY:-full}"
agent_token="bench-agent-token-0123456789"
operator_token="bench-operator-token-0123456789"
python="${PROXI_MCP_HARNESS:-$repo/target/mcp-harness}/venv/bin/python"

say() { printf '[bench-upstream] %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
    say "installing wrk (Debian package)"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
if [[ ! -x "$python" ]]; then
    say "installing the MCP Python SDK (scripts/mcp-harness.sh)"
    "$repo/scripts/mcp-harness.sh"
fi

say "building the release binary"
(cd "$repo" && cargo build --release --quiet)

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

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

fixture_port="$(free_port)"
"$python" "$repo/tests/fixtures/fixture_upstream.py" --http --port "$fixture_port" 2>"$work/fixture.log" &
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
say "fixture at $fixture_url"

cat >"$work/policy.json" <<EOF
{
  "description": "bench-upstream: the fixture's echo, allowed in every mode, with rate limits no run reaches.",
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

declare -A rps p50 p99
run() { # name, url
    local out="$work/$1.out"
    wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$work/$1.lua" "$2" >"$out"
    if grep -q "Non-2xx" "$out"; then cat "$out" >&2; say "$1: some responses were not 2xx"; exit 1; fi
    rps[$1]="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p50[$1]="$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")"
    p99[$1]="$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")"
    say "$1: ${rps[$1]} req/s, p50 ${p50[$1]} ms, p99 ${p99[$1]} ms"
}
say "wrk -t$threads -c$connections -d$duration (each workload in turn)"
run direct "$fixture_url"
run proxi "$url/mcp"

# Every call through Proxi is in the trail: the last record is one of them.
records="$(curl -sf -H "Authorization: Bearer $operator_token" "$url/audit?limit=1")" \
    || { say "cannot read the audit trail"; exit 1; }
grep -q 'fx__echo' <<<"$records" || { say "the audit trail does not show the calls: $records"; exit 1; }

printf '\n%-8s %12s %10s %10s\n' path "req/s" "p50 ms" "p99 ms"
for name in direct proxi; do
    printf '%-8s %12s %10s %10s\n' "$name" "${rps[$name]}" "${p50[$name]}" "${p99[$name]}"
done
ratio="$(awk -v a="${rps[proxi]}" -v b="${rps[direct]}" 'BEGIN {printf "%.2f", a / b}')"
added="$(awk -v a="${p50[proxi]}" -v b="${p50[direct]}" 'BEGIN {printf "%.3f", a - b}')"
printf '\nthroughput ratio proxi/direct: %s (target >= 0.70)\n' "$ratio"
printf 'median added by proxi: %s ms (target <= 1 ms)\n' "$added"
printf 'proxi %s, durability %s, %s connections, %s cores shared by wrk, the fixture and proxi\n' \
    "$("$repo/target/release/proxi" --version | awk '{print $2}')" "$durability" "$connections" "$(nproc)"
