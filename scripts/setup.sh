#!/usr/bin/env bash
# Create .venv (if missing) and install bincount with its test extras into it.
# Used by both README commands and by CI, so a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
