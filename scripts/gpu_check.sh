#!/usr/bin/env bash
# Training-engine check on a CUDA machine: images/s of `search.train.fit` and of a
# minimal hand-written loop for ResNet-18 at 32 px on CIFAR-shaped random uint8
# data (50,000 train / 10,000 val images, batch 512, bf16 autocast, channels_last),
# median of 3 interleaved 2-epoch runs after a 1-epoch warm-up of each, and their ratio.
# About 1-2 minutes on an H100. Needs only torch, torchvision, timm, pydantic, pyyaml
# (and numpy): the project is imported from this checkout, not installed.
#
#   scripts/gpu_check.sh                      # the full check
#   scripts/gpu_check.sh --n 2048 --val 512   # a smoke test (falls back to the CPU without CUDA)
#   scripts/gpu_check.sh --compile            # both loops under torch.compile
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/bench_train.py \
    --device cuda --models resnet_18 --n 50000 --val 10000 --batch-size 512 --epochs 2 --runs 3 "$@"
