#!/usr/bin/env bash
# The GPU checks, in one go: the training-engine comparison (gpu_check.sh) and an
# end-to-end study on CUDA (gpu_smoke.py). Run from the project root on a CUDA machine
# whose Python has torch/torchvision/timm; other packages may come as wheels in .whl/.
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
echo "== gpu_check: fit vs minimal loop, ResNet-18 at 32 px =="
timeout 240 scripts/gpu_check.sh "$@"
echo "== gpu_smoke: python -m search run on CUDA =="
timeout 150 python3 scripts/gpu_smoke.py
echo "== bench_pipeline: batched augmentation on CUDA vs per-sample PIL pipeline (8 CPU workers) =="
timeout 180 python3 scripts/bench_pipeline.py --device cuda --workers 8 --repeat 1
