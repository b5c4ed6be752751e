#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests (real Triton compile, no interpreter) and every benchmark on the GPU.
#
#   bash bench/gpu_suite.sh                      # from the repository root: every group
#   bash bench/gpu_suite.sh tests kernels label  # only these groups (tests kernels label scaling onnx projection),
#   bash bench/gpu_suite.sh scaling onnx projection   # e.g. two calls where one command may run 10 minutes at most
#   bash bench/gpu_suite.sh --smoke              # tiny sizes: checks the script itself (runs on CPU too)
#
# Installs what is missing first: open_clip and ftfy from wheels in .whl/ (bench/fetch_wheels.sh downloads them on a
# machine with a package registry), then this package (pip install -e ., building the C++ extension with CMake).
# Every step runs even when an earlier one fails; the summary at the end lists the failures and the exit code is
# their number. CSV rows (device name, versions, commit in every row) go to bench/results/ and, where the
# environment variable OUT names a folder, are copied there with the log.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
GROUPS_WANTED=()
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    tests | kernels | label | scaling | onnx | projection) GROUPS_WANTED+=("$arg") ;;
    *) echo "unknown argument $arg (groups: tests kernels label scaling onnx projection; --smoke)"; exit 2 ;;
  esac
done
want() {  # want GROUP: true when no group was named or GROUP was
  [[ ${#GROUPS_WANTED[@]} == 0 ]] && return 0
  local g
  for g in "${GROUPS_WANTED[@]}"; do [[ $g == "$1" ]] && return 0; done
  return 1
}
PY=${PYTHON:-python3}
OUTDIR=${OUT:-}
LOG=bench/results/gpu_suite.log
mkdir -p bench/results
: >"$LOG"
export PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME CMD...: run, log, remember failures, go on
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  if "$@" 2>&1 | tee -a "$LOG"; then
    echo "=== $name: ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
  else
    echo "=== $name: FAILED ($((SECONDS - t0)) s)" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

if ! $PY -c "import open_clip" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    step install-wheels $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/cdul-site .whl/*.whl
    export PYTHONPATH=/tmp/cdul-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "open_clip is not installed and .whl/ has no wheels: run bench/fetch_wheels.sh where pip can download" \
      | tee -a "$LOG"
    exit 2
  fi
fi
if ! $PY -c "import cdul_fast" 2>/dev/null; then
  step install-package $PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
step environment $PY -c "from cdul_fast._backend import backend_report; print(backend_report())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG" || true

if [[ $SMOKE == 1 ]]; then
  want tests && step tests-gpu $PY -m pytest -q -m gpu tests/test_kernels.py tests/test_tensor_views.py
  want kernels && step kernels $PY bench/bench_kernels.py --quick
  want label && step label-shapes $PY bench/bench_label.py --images 16 --naive-images 2 --batch-size 8 \
    --decoders auto,tensor
  want scaling && step scaling $PY bench/bench_scaling.py --sizes 20 40
  want onnx && step onnx $PY bench/bench_onnx.py --arch clipres --size 64 --batch 1 4
  want projection && step projection $PY bench/project_nus.py
else
  want tests && step tests-gpu env TRITON_INTERPRET=0 $PY -m pytest -q -m gpu tests/
  want kernels && step kernels $PY bench/bench_kernels.py
  # the shipped toy CLIP (64 px views: decode-bound by design) and RN50x64 at 448 px (the paper's encoder, random
  # weights: throughput does not depend on them), NUS-WIDE-sized JPEGs (500x375)
  want label && step label-shapes $PY bench/bench_label.py --images 512 --side 375 --batch-size 64 \
    --decoders tensor,pil
  want label && step label-rn50x64 $PY bench/bench_label.py --images 192 --side 375 --batch-size 32 \
    --naive-images 4 --clip RN50x64 --clip-weights random --decoders tensor,pil
  want scaling && step scaling $PY bench/bench_scaling.py --sizes 500 1000 2000 4000
  want onnx && step onnx-resnet50 $PY bench/bench_onnx.py --arch resnet50 --size 224 --batch 1 32
  want onnx && step onnx-clipres $PY bench/bench_onnx.py --arch clipres --size 128 --batch 1 64
  want projection && step projection $PY bench/project_nus.py
fi

if [[ -n "$OUTDIR" ]]; then
  cp bench/results/*.csv "$LOG" "$OUTDIR"/ 2>/dev/null || true
fi
echo "=== summary: ${#FAILED[@]} failed step(s)${FAILED[*]:+: ${FAILED[*]}}" | tee -a "$LOG"
exit ${#FAILED[@]}
