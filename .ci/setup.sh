#!/usr/bin/env bash
# Installs everything the test suite needs on Debian/Ubuntu (run as root or with sudo):
# the real servers the tests start (Dovecot, Prometheus, Alertmanager, blackbox_exporter
# for the benchmark) and a virtualenv in .venv with the package and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

# nsd, unbound, bind9-utils: the DNS tests' authoritative server, validating resolver
# and zone signing (tests/support/dns.py). chromium: the headless browser that loads
# the landing page (tests/test_history_browser.py, driven over the DevTools protocol).
packages=(dovecot-pop3d prometheus prometheus-alertmanager prometheus-blackbox-exporter openssl python3-venv
    nsd unbound bind9-utils chromium)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo)
    "${as_root[@]}" apt-get update -q
    # The packages' services must not start on their own: the tests run the binaries
    # on loopback with their own configs. invoke-rc.d asks policy-rc.d first (exit 101:
    # do not start); where none exists, one stands in during the install, since a
    # started unbound service would fetch the root trust anchor from the internet.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        trap '"${as_root[@]}" rm -f "$policy"' EXIT
        printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
        "${as_root[@]}" chmod 755 "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts these services when it can (not inside containers); the tests need
# their ports free of nothing, but stop them anyway so nothing probes the host.
for service in dovecot prometheus prometheus-alertmanager prometheus-blackbox-exporter nsd unbound; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup done: $(.venv/bin/python --version), dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1)"
