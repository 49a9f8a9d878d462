#!/usr/bin/env bash
# Every GPU figure in one run (a lent GPU's time is short): the GPU tests (cuDNN attention, a
# training step), then sampling (one SD1.5 UNet + ControlNet evaluation at 512x512, 16 frames)
# and motion-module training (SD1.5 + v3 layout, 16x256x256 clips, batch 4) at full size with
# random weights, bf16, ours against diffusers (SDPA) on the same device, with MFU.
#
#   bash benchmarks/gpu.sh            # writes benchmarks/out/gpu-*.{txt,md,json}
#
# Needs the CUDA build of JAX (pip install "jax[cuda12]") and of torch beside the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
py=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
JAX_PLATFORMS=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  | tee "$out/gpu-tests.txt"
"$py" benchmarks/animate.py --config sd15 --device gpu --skip-pipeline \
  --out "$out/gpu-sampling.md" --json "$out/gpu-sampling.json"
"$py" benchmarks/train.py --config sd15 --device gpu --json "$out/gpu-train.json" \
  | tee "$out/gpu-train.md"
