#!/usr/bin/env bash
# Installs the third-party MCP clients that Proxi's end-to-end tests drive:
#   - a Python venv with the official MCP Python SDK (PyPI `mcp`, pinned, with
#     every transitive package pinned by tests/mcp-harness/python-constraints.txt);
#   - an npm prefix with Node 22 (npm package `node`), the official conformance
#     suite (`@modelcontextprotocol/conformance`) and the MCP Inspector
#     (`@modelcontextprotocol/inspector`, needs Node >= 22.19), from the committed lockfile.
# Everything goes to target/mcp-harness/ (or $PROXI_MCP_HARNESS). Idempotent: a step
# whose pinned inputs have not changed since it last succeeded is skipped.
# Needs only python3 (with venv) and npm (Node 20 is enough to install Node 22).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pins="$repo/tests/mcp-harness"
harness="${PROXI_MCP_HARNESS:-$repo/target/mcp-harness}"
mkdir -p "$harness"

say() { printf '[mcp-harness] %s\n' "$*" >&2; }

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- Python: venv + pinned MCP SDK -------------------------------------------
python_stamp="$(stamp_of "$pins/requirements.txt" "$pins/python-constraints.txt")"
if [[ -x "$harness/venv/bin/python" && "$(cat "$harness/venv/.proxi-stamp" 2>/dev/null)" == "$python_stamp" ]]; then
    say "python venv is up to date"
else
    say "creating the python venv"
    rm -rf "$harness/venv"
    if ! python3 -m venv "$harness/venv" 2>/dev/null; then
        # Debian splits venv (and ensurepip) out of python3.
        say "python3 has no venv module; installing python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$harness/venv"
        python3 -m venv "$harness/venv"
    fi
    "$harness/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$pins/requirements.txt" -c "$pins/python-constraints.txt"
    echo "$python_stamp" > "$harness/venv/.proxi-stamp"
fi

# --- Node 22 + conformance suite ------------------------------------------------
npm_stamp="$(stamp_of "$pins/package.json" "$pins/package-lock.json")"
node22="$harness/npm/node_modules/node/bin/node"
if [[ -x "$node22" && "$(cat "$harness/npm/.proxi-stamp" 2>/dev/null)" == "$npm_stamp" ]]; then
    say "node 22, the conformance suite and the inspector are up to date"
else
    say "installing node 22, the conformance suite and the inspector (npm ci)"
    mkdir -p "$harness/npm"
    cp "$pins/package.json" "$pins/package-lock.json" "$harness/npm/"
    # The `node` package fetches its platform binary in an install script, so scripts must run.
    (cd "$harness/npm" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$npm_stamp" > "$harness/npm/.proxi-stamp"
fi

say "python: $("$harness/venv/bin/python" -c 'import importlib.metadata as m; print("mcp", m.version("mcp"))')"
say "node:   $("$node22" --version), conformance $("$node22" "$harness/npm/node_modules/@modelcontextprotocol/conformance/dist/index.js" --version), inspector $("$node22" "$harness/npm/node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js" --version)"
