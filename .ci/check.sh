#!/usr/bin/env bash
# Lint, type-check and run the whole test suite (after .ci/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check pop3_exporter tests bench
.venv/bin/ruff format --check pop3_exporter tests bench
.venv/bin/mypy --strict pop3_exporter
.venv/bin/python -m pytest "$@"
