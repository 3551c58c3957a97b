#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (after .ci/setup.sh); then lint, type-check
# and most of the tests again with every dependency at the lowest version pyproject.toml
# allows (.venv-floor).
# Arguments go to both pytest runs; FLOORS=0 skips the second pass (for quick local runs).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict pop3_exporter tests
.venv/bin/python -m pytest "$@"

[[ ${FLOORS:-1} == 0 ]] && exit 0
if [[ ! -x .venv-floor/bin/python ]]; then
    echo "no .venv-floor: run bash .ci/setup.sh first" >&2
    exit 1
fi
echo "floor pass: $(tr '\n' ' ' <.venv-floor/floors.txt)"
# The linters at their floors: ruff reads only the code; mypy reads the libraries of
# .venv, because what a library's type hints said at its floor (bcrypt 3.1.4 has none)
# is no question of whether the exporter runs with it. Stub packages' floors
# (types-PyYAML) are therefore checked only when they are raised, by hand.
.venv-floor/bin/ruff check -q .
.venv-floor/bin/ruff format --check -q .
.venv-floor/bin/mypy --python-executable .venv/bin/python --cache-dir .venv-floor/mypy-cache \
    --strict pop3_exporter
# Not the tests marked slow, prometheus, browser or dovecot: load and soak runs,
# Prometheus and Alertmanager end to end, the landing page in Chromium, and the many
# dialogues with a real Dovecot call the dependencies (aiohttp's server and client, the
# encoders, cryptography's certificate parsing) exactly as the quick tests with fake
# servers do, only at length, and they take most of the time. The mailpath tests stay:
# they alone drive aiosmtplib against a real SMTP server. Every floor raised so far
# was caught by what is left.
status=0
floor_tests="not slow and not prometheus and not browser and (mailpath or not dovecot)"
.venv-floor/bin/python -m pytest -m "$floor_tests" "$@" || status=$?
# 5: the arguments chose only tests that the floor pass leaves out.
if ((status == 5)); then
    exit 0
fi
exit "$status"
