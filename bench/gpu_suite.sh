#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests (real Triton compile, no interpreter) and every benchmark on the GPU.
# Results are appended to bench/results/*.csv (device name, versions, commit in every row).
#   bash bench/gpu_suite.sh            # from the repository root, with the package installed (pip install -e .)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/test_kernels.py
python bench/bench_kernels.py
python bench/bench_label.py --images 512 --batch-size 64 --device cuda --clip shapes-clip
python bench/bench_onnx.py --arch resnet50 --size 224 --batch 1 32
python bench/bench_onnx.py --arch clipres --size 128 --batch 1 64
