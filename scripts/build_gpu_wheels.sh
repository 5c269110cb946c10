#!/usr/bin/env bash
# Build the wheel folder that benchmarks/gpu_check.sh installs on a GPU machine whose image has
# Python 3.12 + torch but no flwr/ray and no network (see scripts/build_gpu_wheels.py):
#
#   bash scripts/build_gpu_wheels.sh [--out .gpu-wheels] [--python-version 3.12] [--max-mib 40]
#
# Needs pip with access to the package index (cross-platform `pip download --only-binary`).
# The folder is git-ignored; carry it to the GPU machine next to the checkout.
set -eu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
exec "$PYTHON" "$ROOT/scripts/build_gpu_wheels.py" "$@"
