#!/usr/bin/env bash
# The first GPU run, on the GPU machine, from the repository root, with .whl/ carried beside the working tree:
#   bash benchmarks/gpu_first_run.sh "$OUT"
# Installs the wheels the image lacks (benchmarks/gpu_wheels.py; fetched beforehand on a machine with pip), then
# runs benchmarks/gpu_check.py at the paper's shapes (an 8-minute budget). Its JSON and log land in the folder given.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu_first_run.sh OUT_DIR}"
mkdir -p "$out"
python3 -m benchmarks.gpu_wheels install || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
python3 -m benchmarks.gpu_check --out "$out"
