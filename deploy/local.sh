#!/usr/bin/env bash
# Thin wrapper: python -m floral_flwr.deploy local --help (see deploy/README.md)
set -euo pipefail
PY="${PYTHON:-python}"
exec "$PY" -m floral_flwr.deploy local "$@"
