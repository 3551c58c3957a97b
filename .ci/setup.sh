#!/usr/bin/env bash
# Installs everything the test suite needs on Debian/Ubuntu (run as root or with sudo):
# the real servers the tests start (Dovecot, Prometheus, Alertmanager, blackbox_exporter
# for the benchmark), a virtualenv in .venv with the package and its test tools, and one
# in .venv-floor with the same at the lowest versions pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(dovecot-pop3d prometheus prometheus-alertmanager prometheus-blackbox-exporter openssl python3-venv)
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
    # on loopback with their own configs.
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts these services when it can (not inside containers); the tests need
# their ports free of nothing, but stop them anyway so nothing probes the host.
for service in dovecot prometheus prometheus-alertmanager prometheus-blackbox-exporter; do
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
echo "setup done: $(.venv/bin/python --version), dovecot $(dovecot --version 2>/dev/null | cut -d' ' -f1)"
