#!/usr/bin/env bash
# Makes PostgreSQL's server binaries available to the scale-out tests
# (tests/scale_out.rs), which create a throwaway cluster per test with initdb in a
# temporary directory and never touch a system cluster. Installs Debian
# `postgresql` if it is missing and records the bin dir in
# target/postgres-harness/bin-dir. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

find_bin() {
    local dir found=""
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            found="$dir"
        fi
    done
    echo "$found"
}

bin="${PROXI_POSTGRES_BIN:-$(find_bin)}"
if [ -z "$bin" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "PostgreSQL is not installed and this is not root: apt-get install -y postgresql" >&2
        exit 1
    fi
    echo "installing PostgreSQL (Debian postgresql)" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
    bin="$(find_bin)"
fi
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "PostgreSQL server binaries not found after installation" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "running as root, but there is no postgres user to own the test clusters" >&2
    exit 1
fi
mkdir -p target/postgres-harness
echo "$bin" > target/postgres-harness/bin-dir
echo "PostgreSQL server binaries: $bin" >&2
