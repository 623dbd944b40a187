#!/usr/bin/env bash
# The project's test command. On a fresh machine it first installs what the
# end-to-end MCP tests need (Python MCP SDK in a venv, Node 22 and the MCP
# conformance suite), idempotently, under target/mcp-harness/ (ignored by git),
# the upstream MCP servers the upstream tests govern, under target/upstream-harness/,
# headless Chromium with its WebDriver for the console test (Debian packages),
# and PostgreSQL for the scale-out tests (scripts/postgres-harness.sh);
# then it runs every test with cargo nextest. Extra arguments go to nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/mcp-harness.sh
scripts/upstream-harness.sh
scripts/browser-harness.sh
scripts/postgres-harness.sh

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

cargo nextest run --locked --all-targets "$@"
