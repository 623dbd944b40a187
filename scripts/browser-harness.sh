#!/usr/bin/env bash
# Installs what tests/console_browser.rs drives: headless Chromium and its
# WebDriver (Debian `chromium`, `chromium-driver`), if they are missing.
# Idempotent: with both on PATH it does nothing. Needs root (apt-get) the first time.
set -euo pipefail

say() { printf '[browser-harness] %s\n' "$*" >&2; }

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    say "chromium and chromedriver are installed"
    exit 0
fi

say "installing chromium and chromium-driver"
if [[ "$(id -u)" -ne 0 ]]; then
    say "apt-get needs root: run as root, or install chromium and chromium-driver yourself"
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
say "installed $(chromium --version 2>/dev/null || echo chromium)"
