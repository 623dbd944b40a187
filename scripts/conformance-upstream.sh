#!/usr/bin/env bash
# The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
# pinned by tests/mcp-harness/) against server-everything directly, and against
# Proxi's /mcp in front of the same server (a policy that allows all its tools),
# scenario by scenario. Prints a table and exits non-zero when Proxi fails a
# scenario that server-everything passes directly (issue 10: Proxi must not, unless
# it changes the behaviour on purpose; list those in EXPECTED_CHANGES).
#
# The suite's client cannot send a bearer token, so it reaches Proxi through
# tests/fixtures/token_relay.py, which adds the agent token and changes nothing
# else but its own port in Host/Origin.
#
# Settings (environment): SCENARIOS (default: every server scenario the suite
# lists), EXPECTED_CHANGES (space-separated scenarios Proxi changes on purpose).
# Needs node, the harnesses of scripts/mcp-harness.sh and scripts/upstream-harness.sh
# (run here if missing) and a debug build of proxi (built here).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mcp_harness="${PROXI_MCP_HARNESS:-$repo/target/mcp-harness}"
upstream_harness="${PROXI_UPSTREAM_HARNESS:-$repo/target/upstream-harness}"
agent_token="conformance-agent-token-0123456789"
operator_token="conformance-operator-token-0123456789"
expected_changes=" ${EXPECTED_CHANGES:-} "

say() { printf '[conformance-upstream] %s\n' "$*" >&2; }

"$repo/scripts/mcp-harness.sh"
"$repo/scripts/upstream-harness.sh"
node22="$mcp_harness/npm/node_modules/node/bin/node"
suite="$mcp_harness/npm/node_modules/@modelcontextprotocol/conformance/dist/index.js"
python="$mcp_harness/venv/bin/python"
everything="$upstream_harness/node_modules/@modelcontextprotocol/server-everything/dist/index.js"

say "building proxi"
(cd "$repo" && cargo build --quiet --bin proxi)
proxi="$repo/target/debug/proxi"

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for_http() { # url, pid, log
    for _ in $(seq 1 600); do
        curl -s -o /dev/null "$1" && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; return 1; }
        sleep 0.05
    done
    return 1
}

# server-everything over Streamable HTTP, for the direct run.
everything_port="$(free_port)"
PORT="$everything_port" node "$everything" streamableHttp >"$work/everything.log" 2>&1 &
pids+=($!)
wait_for_http "http://127.0.0.1:$everything_port/mcp" "${pids[-1]}" "$work/everything.log" \
    || { say "server-everything did not start"; exit 1; }
direct_url="http://127.0.0.1:$everything_port/mcp"

# Proxi in front of server-everything (stdio), every tool allowed in every mode.
cat >"$work/policy.json" <<EOF
{
  "description": "conformance-upstream: server-everything behind Proxi, all of its tools allowed.",
  "default_mode": "NORMAL",
  "max_emergency_ttl_seconds": 3600,
  "rate_limits": [{"principal": "*", "tools": "*", "rate": "1000000/s", "burst": 1000000}],
  "upstreams": {"everything": {"command": "node", "args": ["$everything", "stdio"], "required": true}},
  "global_rules": {"always_blocked": []},
  "modes": {
    "NORMAL": {"allowed_tools": ["everything__*"]},
    "EMERGENCY": {"allowed_tools": ["everything__*"]}
  }
}
EOF
PROXI_AGENT_TOKEN="$agent_token" PROXI_OPERATOR_TOKEN="$operator_token" RUST_LOG=warn \
    "$proxi" serve --bind 127.0.0.1:0 --data-dir "$work/data" --policy "$work/policy.json" \
    2>"$work/proxi.log" &
pids+=($!)
proxi_pid="${pids[-1]}"
proxi_url=""
for _ in $(seq 1 1200); do
    if [[ -f "$work/data/server.json" ]]; then
        proxi_url="$(sed -n 's/.*"url": *"\([^"]*\)".*/\1/p' "$work/data/server.json")"
        [[ -n "$proxi_url" ]] && break
    fi
    kill -0 "$proxi_pid" 2>/dev/null || { cat "$work/proxi.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n "$proxi_url" ]] || { say "proxi did not start"; cat "$work/proxi.log" >&2; exit 1; }
proxi_port="${proxi_url##*:}"

relay_port="$(free_port)"
"$python" "$repo/tests/fixtures/token_relay.py" --listen-port "$relay_port" \
    --target-port "$proxi_port" --token "$agent_token" 2>"$work/relay.log" &
pids+=($!)
wait_for_http "http://127.0.0.1:$relay_port/health" "${pids[-1]}" "$work/relay.log" \
    || { say "the token relay did not start"; exit 1; }
via_proxi_url="http://127.0.0.1:$relay_port/mcp"
say "direct: $direct_url; through proxi: $via_proxi_url (proxi at $proxi_url)"

if [[ -n "${SCENARIOS:-}" ]]; then
    read -r -a scenarios <<<"$SCENARIOS"
else
    mapfile -t scenarios < <("$node22" "$suite" list --server | sed -n 's/^  - \([a-z0-9-]*\).*/\1/p')
fi
[[ ${#scenarios[@]} -gt 0 ]] || { say "the suite lists no server scenarios"; exit 1; }

# "pass", "fail (passed/total)" or "error", from the suite's last summary line.
outcome() { # url, scenario
    local log="$work/$2-$3.log"
    if timeout 120 "$node22" "$suite" server --url "$1" --scenario "$2" >"$log" 2>&1; then
        echo pass
    else
        local summary
        summary="$(grep -Eo 'Passed: [0-9]+/[0-9]+' "$log" | tail -1)"
        if [[ -n "$summary" ]]; then echo "fail (${summary#Passed: })"; else echo error; fi
    fi
}

regressions=()
printf '\n%-34s %-16s %-16s %s\n' scenario "direct" "through proxi" note
for scenario in "${scenarios[@]}"; do
    direct="$(outcome "$direct_url" "$scenario" direct)"
    proxied="$(outcome "$via_proxi_url" "$scenario" proxi)"
    note=""
    if [[ "$direct" == pass && "$proxied" != pass ]]; then
        if [[ "$expected_changes" == *" $scenario "* ]]; then
            note="changed on purpose"
        else
            note="REGRESSION"
            regressions+=("$scenario")
        fi
    elif [[ "$direct" != pass && "$proxied" == pass ]]; then
        note="proxi passes, upstream does not"
    fi
    printf '%-34s %-16s %-16s %s\n' "$scenario" "$direct" "$proxied" "$note"
done
printf '\nconformance %s, server-everything %s, proxi %s\n' \
    "$("$node22" "$suite" --version)" \
    "$(node -p "require('$upstream_harness/node_modules/@modelcontextprotocol/server-everything/package.json').version")" \
    "$("$proxi" --version | awk '{print $2}')"
if [[ ${#regressions[@]} -gt 0 ]]; then
    say "proxi fails what server-everything passes directly: ${regressions[*]} (logs kept in $work)"
    trap - EXIT
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    exit 1
fi
