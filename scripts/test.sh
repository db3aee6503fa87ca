#!/usr/bin/env bash
# Set up a virtualenv with the test dependencies and run the test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
# -m "slow or not slow": everything, the slow schedule test included, once (pyproject's addopts leaves it out)
python -m pytest -q -m "slow or not slow" "$@"
