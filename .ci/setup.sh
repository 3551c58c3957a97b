#!/usr/bin/env bash
# Installs everything the test suite needs on Debian/Ubuntu (run as root or with sudo):
# the real servers the tests start (Dovecot with POP3 and LMTP, Postfix, Prometheus,
# Alertmanager, blackbox_exporter for the benchmark), a virtualenv in .venv with the
# package and its test tools, and one in .venv-floor with the same at the lowest
# versions pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")/.."

# nsd, unbound, bind9-utils: the DNS tests' authoritative server, validating resolver
# and zone signing (tests/support/dns.py). postfix, dovecot-lmtpd: the mail path of the
# delivery tests (tests/support/mailpath.py). chromium: the headless browser that loads
# the landing page (tests/test_history_browser.py, driven over the DevTools protocol).
packages=(dovecot-pop3d prometheus prometheus-alertmanager prometheus-blackbox-exporter openssl python3-venv
    nsd unbound bind9-utils postfix dovecot-lmtpd chromium)
missing=()
installing_postfix=false
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    [[ " ${missing[*]} " == *" postfix "* ]] && installing_postfix=true
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo)
    "${as_root[@]}" apt-get update -q
    # Postfix without a system configuration: no /etc/postfix/main.cf, so neither its init
    # script nor its systemd unit (ConditionPathExists=/etc/postfix/main.cf) starts a
    # master. The tests run Postfix's master themselves with their own config directory.
    echo "postfix postfix/main_mailer_type select No configuration" |
        "${as_root[@]}" debconf-set-selections
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
for service in dovecot postfix prometheus prometheus-alertmanager prometheus-blackbox-exporter nsd unbound; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done
# Should the package have started a system master after all (it would listen on port 25),
# stop it by the PID in its lock file, after checking that this PID is a Postfix master.
# Only when this run installed Postfix: a machine's own, configured mail system is left alone.
master_pid_file=/var/spool/postfix/pid/master.pid
if $installing_postfix && [[ -r $master_pid_file ]]; then
    pid=$(tr -dc '0-9' <"$master_pid_file")
    if [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == master ]]; then
        echo "stopping the system Postfix master (PID $pid)"
        as_root=()
        [[ $(id -u) -eq 0 ]] || as_root=(sudo)
        "${as_root[@]}" kill -TERM "$pid"
        for _ in $(seq 50); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
    fi
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# A second virtualenv with every requirement of pyproject.toml at its floor, the lowest
# version it allows (.ci/floors.py derives them); check.sh runs the tests in it again.
# Kept while the floors stay the same; made anew when they change.
floors=$(.venv/bin/python .ci/floors.py)
if [[ ! -x .venv-floor/bin/python || "$(cat .venv-floor/floors.txt 2>/dev/null)" != "$floors" ]]; then
    rm -rf .venv-floor
    "$python" -m venv .venv-floor
    printf '%s\n' "$floors" >.venv-floor/constraints.txt
    .venv/bin/python .ci/floors.py --build >.venv-floor/build-requirements.txt
    # The build backend at its floor too, hence no build isolation. The log is shown only
    # on failure: old setuptools warns about editable installs at length.
    if ! {
        .venv-floor/bin/python -m pip install --upgrade pip &&
            .venv-floor/bin/python -m pip install -r .venv-floor/build-requirements.txt &&
            .venv-floor/bin/python -m pip install --no-build-isolation \
                -c .venv-floor/constraints.txt -e '.[test]'
    } >.venv-floor/install.log 2>&1; then
        cat .venv-floor/install.log >&2
        echo "could not install the floors of pyproject.toml into .venv-floor" >&2
        exit 1
    fi
    # Written last: an install that failed half-way is not taken for a finished one.
    printf '%s' "$floors" >.venv-floor/floors.txt
fi
echo "setup done: $(.venv/bin/python --version), dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1)," \
    "postfix $(/usr/sbin/postconf -d -h mail_version 2>/dev/null)"
