#!/usr/bin/env bash
# What the test suite needs beyond Python packages, installed if missing (Debian/Ubuntu, as root or
# with sudo): chromium for the dashboard's browser test (driven by Playwright, which uses this binary
# and downloads no browser of its own) and promtool (the prometheus package) to check the alert rules.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "install_test_tools: installing ${missing[*]} (apt-get)"
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "install_test_tools: ${missing[*]} missing and not root; install them with apt-get" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts a prometheus service with the package; the tests only need its promtool.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "install_test_tools: ${missing[*]} ready"
