#!/usr/bin/env bash
# The GPU checks, in one go, on a CUDA machine whose Python has torch/torchvision/timm; other
# packages may come as wheels in .whl/ (see shared/device/README.md). Run from anywhere:
#
#   scripts/device_checks.sh          # the study checks: about 8 minutes (run with timeout_s >= 540)
#   scripts/device_checks.sh all      # also the engine, smoke and pipeline checks (about 10 minutes more)
#
# Study checks: a real CUDA out-of-memory error retried in micro-batches (gpu_oom_check.py, ~30 s),
# then bench_study.py within a 420 s budget: ResNet-18 50 x 15 with no pruner and with Hyperband,
# the 64 px pool, MiniCNN 28 px packed vs one trial per GPU; it prints the goal figures last.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
echo "== gpu_oom_check: a real CUDA out-of-memory error in fit, retried in micro-batches =="
timeout 60 python3 scripts/gpu_oom_check.py
echo "== bench_study: whole studies on one GPU (420 s budget) =="
timeout 480 python3 scripts/bench_study.py --budget "${BENCH_BUDGET:-420}"
if [ "${1:-}" = all ]; then
  echo "== gpu_check: fit vs minimal loop, ResNet-18 at 32 px =="
  timeout 240 scripts/gpu_check.sh
  echo "== gpu_smoke: python -m search run on CUDA =="
  timeout 150 python3 scripts/gpu_smoke.py
  echo "== bench_pipeline: batched augmentation on CUDA vs per-sample PIL pipeline (8 CPU workers) =="
  timeout 180 python3 scripts/bench_pipeline.py --device cuda --workers 8 --repeat 1
fi
