#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (after .ci/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy --strict pop3_exporter
.venv/bin/python -m pytest "$@"
