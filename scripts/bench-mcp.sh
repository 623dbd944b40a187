#!/usr/bin/env bash
# tools/call throughput over MCP Streamable HTTP against POST /tools/execute,
# on one `proxi serve` (release build), in one run, with wrk on loopback.
#
# Three workloads, each the same governed call (get_service_status web-server),
# each answered by the same gateway and recorded in the same audit trail:
#   rest         POST /tools/execute
#   mcp-session  POST /mcp tools/call in one initialized session (Mcp-Session-Id),
#                as Claude Desktop, IDEs and the TypeScript/Python SDKs' handshake use it
#   mcp-2026     POST /mcp tools/call with the stateless 2026-07-28 per-request
#                metadata and Mcp-Method/Mcp-Name headers (what the Python SDK 2.x
#                picks by default)
#
# Settings (environment): DURATION (10s), CONNECTIONS (16), THREADS (2),
# DURABILITY (process | full; default process, so that fsync does not hide the
# protocol's cost). wrk shares the machine's cores with the server.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
duration="${DURATION:-10s}"
connections="${CONNECTIONS:-16}"
threads="${THREADS:-2}"
durability="${DURABILITY:-process}"
agent_token="bench-agent-token-0123456789"
operator_token="bench-operator-token-0123456789"

say() { printf '[bench-mcp] %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null; then
    say "installing wrk (Debian package)"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi

say "building the release binary"
(cd "$repo" && cargo build --release --quiet)

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

PROXI_AGENT_TOKEN="$agent_token" PROXI_OPERATOR_TOKEN="$operator_token" RUST_LOG=warn \
    "$repo/target/release/proxi" serve --bind 127.0.0.1:0 --data-dir "$work/data" \
    --policy "$repo/policies/high_rate_limits.json" --durability "$durability" 2>"$work/server.log" &
server_pid=$!

# Wait (with a deadline) for the server to record its URL.
url=""
for _ in $(seq 1 600); do
    if [[ -f "$work/data/server.json" ]]; then
        url="$(sed -n 's/.*"url": *"\([^"]*\)".*/\1/p' "$work/data/server.json")"
        [[ -n "$url" ]] && break
    fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n "$url" ]] || { say "the server did not start"; exit 1; }
say "proxi serve at $url (durability: $durability)"

mcp_headers=(-H "Authorization: Bearer $agent_token" -H "Content-Type: application/json"
    -H "Accept: application/json, text/event-stream")

# One session, as a handshake-era client holds it.
session="$(curl -s -D - -o /dev/null "${mcp_headers[@]}" "$url/mcp" -d \
    '{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"wrk","version":"1"}}}' \
    | tr -d '\r' | sed -n 's/^mcp-session-id: //Ip')"
[[ -n "$session" ]] || { say "initialize gave no session id"; exit 1; }
curl -s -o /dev/null "${mcp_headers[@]}" -H "Mcp-Session-Id: $session" -H "MCP-Protocol-Version: 2025-11-25" \
    "$url/mcp" -d '{"jsonrpc":"2.0","method":"notifications/initialized"}'

call='"method":"tools/call","params":{"name":"get_service_status","arguments":{"service_name":"web-server"}'
meta='"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"wrk","version":"1"},"io.modelcontextprotocol/clientCapabilities":{}}'

# Sanity: each workload must succeed before it is timed.
curl -sf -H "Authorization: Bearer $agent_token" -H "Content-Type: application/json" "$url/tools/execute" \
    -d '{"tool_name":"get_service_status","arguments":{"service_name":"web-server"}}' | grep -q '"success":true'
curl -sf "${mcp_headers[@]}" -H "Mcp-Session-Id: $session" -H "MCP-Protocol-Version: 2025-11-25" "$url/mcp" \
    -d "{\"jsonrpc\":\"2.0\",\"id\":\"check\",$call}}" | grep -q '"isError":false'
curl -sf "${mcp_headers[@]}" -H "MCP-Protocol-Version: 2026-07-28" -H "Mcp-Method: tools/call" \
    -H "Mcp-Name: get_service_status" "$url/mcp" \
    -d "{\"jsonrpc\":\"2.0\",\"id\":\"check\",$call,$meta}}" | grep -q '"isError":false'

cat >"$work/rest.lua" <<EOF
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $agent_token"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"tool_name":"get_service_status","arguments":{"service_name":"web-server"}}'
EOF

# Request ids must be unique among a session's requests in flight: thread id + counter.
write_mcp_lua() { # file, extra header line, params suffix
    cat >"$1" <<EOF
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local counter = 0
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $agent_token"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
$2
function request()
    counter = counter + 1
    local body = string.format('{"jsonrpc":"2.0","id":"%d-%d",$call$3}}', tid, counter)
    return wrk.format(nil, nil, nil, body)
end
EOF
}
write_mcp_lua "$work/mcp-session.lua" \
    "wrk.headers[\"Mcp-Session-Id\"] = \"$session\"; wrk.headers[\"MCP-Protocol-Version\"] = \"2025-11-25\"" ""
write_mcp_lua "$work/mcp-2026.lua" "wrk.headers[\"MCP-Protocol-Version\"] = \"2026-07-28\"; \
wrk.headers[\"Mcp-Method\"] = \"tools/call\"; wrk.headers[\"Mcp-Name\"] = \"get_service_status\"" ",$meta"

declare -A rps p99
run() { # name, path
    local out="$work/$1.out"
    wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$work/$1.lua" "$url$2" >"$out"
    if grep -q "Non-2xx" "$out"; then cat "$out" >&2; say "$1: some responses were not 2xx"; exit 1; fi
    rps[$1]="$(awk '/^Requests\/sec:/ {print $2}' "$out")"
    p99[$1]="$(awk '$1 == "99%" {print $2}' "$out")"
    say "$1: ${rps[$1]} req/s, p99 ${p99[$1]}"
}
say "wrk -t$threads -c$connections -d$duration (each workload in turn)"
run rest /tools/execute
run mcp-session /mcp
run mcp-2026 /mcp

printf '\n%-12s %12s %10s %18s\n' workload "req/s" p99 "ratio to rest"
for name in rest mcp-session mcp-2026; do
    ratio="$(awk -v a="${rps[$name]}" -v b="${rps[rest]}" 'BEGIN {printf "%.2f", a / b}')"
    printf '%-12s %12s %10s %18s\n' "$name" "${rps[$name]}" "${p99[$name]}" "$ratio"
done
printf '\nproxi %s, durability %s, %s cores shared by wrk and the server\n' \
    "$("$repo/target/release/proxi" --version | awk '{print $2}')" "$durability" "$(nproc)"
