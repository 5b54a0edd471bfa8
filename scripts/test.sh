#!/usr/bin/env bash
# Fresh virtual environment, pinned install, lint, then the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-test}
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -c constraints.txt -e ".[dev]"
"$venv/bin/ruff" check --no-cache .
"$venv/bin/ruff" format --no-cache --check .
"$venv/bin/python" -m pytest -q "$@"
