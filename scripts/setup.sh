#!/usr/bin/env bash
# Create .venv (if missing) and install bincount with its test extras into it, and Java 17
# for TorchServe (SageMaker's serving stack, which the toolkit tests run) where it is missing.
# Used by both README commands and by CI, so a fresh machine needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) \
      || echo "setup: could not install Java 17; the serving toolkit tests will skip" >&2
  else
    echo "setup: no Java (install a JRE 17); the serving toolkit tests will skip" >&2
  fi
fi
