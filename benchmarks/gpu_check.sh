#!/usr/bin/env bash
# The GPU workstation check in one command (issue 17). On a machine with a CUDA GPU:
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out DIR] [--wheels DIR] [--work DIR] [--budget-s N]
#                                [--parts "env tests core inline deploy"]
#
# 1. If `flwr` is not importable, installs every wheel in --wheels (default: .gpu-wheels/ in the
#    repository root, built by scripts/build_gpu_wheels.sh) into a private folder with
#    `pip install --no-index --no-deps --target` and puts it on PYTHONPATH/PATH (nothing is
#    installed into the system or the image's environment).
# 2. Runs benchmarks/gpu_check.py: the cuda-marked tests, the core step benchmark, the in-process
#    runner with 32 clients and a loopback deployment of 4 SuperNodes on the device, each part with
#    a time limit from one budget (cuda: 480 s), then prints one line per part and the summary last.
#
# --parts runs only those parts (e.g. a rerun of the ones that failed: "env deploy").
# --device cpu is the dry run (tiny sizes; tests/test_gpu_check.py runs it in the normal suite).
# Results: DIR/gpu_check.json, DIR/gpu_check.md, DIR/gpu_check.log (DIR: --out, else $OUT when set,
# else ./gpu-check-<time>). Scratch (installed wheels, random images, run outputs) goes to --work
# (default: a fresh temporary folder, removed at the end). Exit code 0 only if every part is ok.
set -u
# (all in one function: bash parses it whole, so editing this file during a run is harmless)
main() {
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    DEVICE=cuda
    OUT_DIR=${OUT:-}
    WHEELS=$ROOT/.gpu-wheels
    WORK=""
    BUDGET=0
    PARTS="env tests core inline deploy"
    PYTHON=${PYTHON:-python3}

    usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
    while [ $# -gt 0 ]; do
        case "$1" in
            --device) DEVICE=${2:?}; shift 2 ;;
            --out) OUT_DIR=${2:?}; shift 2 ;;
            --wheels) WHEELS=${2:?}; shift 2 ;;
            --work) WORK=${2:?}; shift 2 ;;
            --budget-s) BUDGET=${2:?}; shift 2 ;;
            --parts) PARTS=${2:?}; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) echo "gpu_check.sh: unknown argument '$1' (allowed: --device cuda|cpu, --out, --wheels, --work, --budget-s, --parts)" >&2; exit 2 ;;
        esac
    done
    case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device '$DEVICE' is invalid; allowed: cuda, cpu" >&2; exit 2 ;; esac
    [ -n "$OUT_DIR" ] || OUT_DIR=$PWD/gpu-check-$(date -u +%Y%m%d-%H%M%S)
    mkdir -p "$OUT_DIR" || exit 2
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    OWN_WORK=0
    if [ -z "$WORK" ]; then WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2; OWN_WORK=1; fi
    mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
    cleanup() { [ "$OWN_WORK" = 1 ] && rm -rf "$WORK"; }
    trap cleanup EXIT

    export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    export MPLBACKEND=Agg
    # this checkout's code first, whatever else is installed
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    cd "$ROOT" || exit 2

    NOTE=""
    if ! "$PYTHON" -c "import flwr" 2>/dev/null; then
        shopt -s nullglob
        wheels=("$WHEELS"/*.whl)
        shopt -u nullglob
        if [ ${#wheels[@]} -eq 0 ]; then
            echo "gpu_check.sh: flwr is not importable and '$WHEELS' holds no wheels: build them with" \
                 "scripts/build_gpu_wheels.sh (and carry the folder to this machine)" >&2
            exit 3
        fi
        SITE=$WORK/site
        t0=$(date +%s)
        echo "[gpu_check] installing ${#wheels[@]} wheels from $WHEELS into $SITE"
        if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target "$SITE" "${wheels[@]}" > "$OUT_DIR/gpu_check.log" 2>&1; then
            echo "gpu_check.sh: installing the wheels failed:" >&2
            tail -20 "$OUT_DIR/gpu_check.log" >&2
            exit 3
        fi
        export PYTHONPATH=$ROOT:$SITE${PYTHONPATH#$ROOT}
        export PATH=$SITE/bin:$PATH GPU_CHECK_SITE=$SITE
        NOTE="${#wheels[@]} wheels from $(basename "$WHEELS") installed in $(( $(date +%s) - t0 )) s"
        echo "[gpu_check] $NOTE"
    fi

    "$PYTHON" "$ROOT/benchmarks/gpu_check.py" --device "$DEVICE" --out "$OUT_DIR" --work "$WORK" \
        --budget-s "$BUDGET" --install-note "$NOTE" --parts $PARTS
}
main "$@"
exit $?
