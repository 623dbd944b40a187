#!/usr/bin/env bash
# Installs the third-party MCP servers that Proxi's upstream tests connect to:
# `@modelcontextprotocol/server-filesystem` and `@modelcontextprotocol/server-everything`,
# pinned by tests/upstream-harness/package.json and its committed lockfile.
# They go to target/upstream-harness/ (or $PROXI_UPSTREAM_HARNESS). Idempotent: when the
# pinned inputs have not changed since the last successful install, nothing is done.
# Needs only node and npm (Node 20 runs both servers).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pins="$repo/tests/upstream-harness"
harness="${PROXI_UPSTREAM_HARNESS:-$repo/target/upstream-harness}"
mkdir -p "$harness"

say() { printf '[upstream-harness] %s\n' "$*" >&2; }

stamp="$(cat "$pins/package.json" "$pins/package-lock.json" | sha256sum | cut -d' ' -f1)"
modules="$harness/node_modules/@modelcontextprotocol"
if [[ -f "$modules/server-filesystem/dist/index.js" && -f "$modules/server-everything/dist/index.js" \
    && "$(cat "$harness/.proxi-stamp" 2>/dev/null)" == "$stamp" ]]; then
    say "server-filesystem and server-everything are up to date"
else
    say "installing server-filesystem and server-everything (npm ci)"
    cp "$pins/package.json" "$pins/package-lock.json" "$harness/"
    (cd "$harness" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$stamp" > "$harness/.proxi-stamp"
fi

say "node $(node --version), server-filesystem $(node -p "require('$modules/server-filesystem/package.json').version"), server-everything $(node -p "require('$modules/server-everything/package.json').version")"
