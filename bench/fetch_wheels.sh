#!/usr/bin/env bash
# Download the wheels bench/gpu_suite.sh installs on a GPU machine that has no package registry: open_clip and its
# two dependencies that such images usually lack (ftfy, wcwidth). Run where pip can reach a registry; .whl/ is
# git-ignored and travels with the suite (device tool: carry [".whl"]). Python 3.12, x86-64 (the GPU image's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
du -sh .whl && ls .whl
