#!/usr/bin/env bash
# Run the tests that exercise Flower internals (warm executor, short SuperNode waits, SecAgg+
# driving, the inline grid, the wire format, deployments) against one pinned flwr version, in a
# venv of its own. CI does not run this (its fresh venv resolves the newest flwr the pin allows);
# run it by hand after touching those parts, once per version in flwr_pins.SUPPORTED_FLWR:
#
#   bash scripts/test_flwr_versions.sh 1.41.0 [--venv DIR] [--slow] [pytest args ...]
#
# --venv DIR   where the venv is built or reused (default: .venv-flwr-<version>, git-ignored)
# --slow       also run the slow end-to-end deployments of these files (each 1-4 min), one file
#              at a time
# Install torch first into that venv for a CPU-only machine (see README); otherwise pip takes
# the default torch wheel. Prints one result line per test file; exits non-zero if any failed.
set -eu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VERSION=${1:?usage: test_flwr_versions.sh FLWR_VERSION [--venv DIR] [--slow] [pytest args ...]}
shift
VENV="$ROOT/.venv-flwr-$VERSION"
SLOW=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --slow) SLOW=1; shift ;;
    *) break ;;
  esac
done

# the files whose tests reach Flower internals or start real SuperLinks / SuperNodes
FILES="test_warm_executor.py test_wire.py test_masked_sum.py test_secagg.py test_deploy.py
test_deploy_e2e.py test_deploy_edge_e2e.py test_deploy_lockdown.py test_client_app.py
test_eval_fold.py test_sum_only.py test_deploy_netns.py"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# flwr named together with the project so that pip cannot resolve a different flwr for it
"$VENV/bin/pip" install -q -e "$ROOT[test]" "flwr[simulation]==$VERSION"
INSTALLED=$("$VENV/bin/python" -c "import flwr; print(flwr.__version__)")
if [ "$INSTALLED" != "$VERSION" ]; then
  echo "error: asked for flwr $VERSION, the venv $VENV has flwr $INSTALLED" >&2
  exit 2
fi

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
FLWR_HOME=$(mktemp -d)
export FLWR_HOME
trap 'rm -rf "$FLWR_HOME"' EXIT
cd "$ROOT"
MARKS="not slow"
[ "$SLOW" = 1 ] && MARKS="slow or not slow"
failed=0
for f in $FILES; do
  if out=$(PYTHONPATH="$ROOT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "$MARKS" "tests/$f" "$@" 2>&1); then
    rc=0
  else
    rc=$?
  fi
  # pytest exit 5 = nothing selected (a file with only slow tests without --slow)
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
    failed=1
    echo "$out" | tail -40
  fi
  echo "flwr $VERSION  $f: $(echo "$out" | tail -1)"
done
exit $failed
