#!/usr/bin/env bash
# Set up, ingest the sample project with the embedded default model, then query the store (README: "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e .
woolocal ingest sample
woolocal query sample "who keeps the key to the tool shed?" -k 3
