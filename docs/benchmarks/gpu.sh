#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, in one run (about 10 minutes of an H200): the SD1.5 target (esd-x, 1000 fast updates at
# 512x512), then peak memory of each case at SD1.5 size and 512x512 and at SDXL size and 1024x1024, in bf16
# (4 updates, 10 sampling steps: enough for the peak, not for timing).
# Usage: bash docs/benchmarks/gpu.sh [OUTPUT_FOLDER]   (needs the package installed, or the repository root on PYTHONPATH)
set -uo pipefail
out=${1:-docs/benchmarks}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
bench() { echo "+ esd-erase bench $*"; date +%T; python3 -m esd_core bench --device cuda "$@"; }
bench --random-weights sd1 --resolution 512 --iterations 1000 --methods esd-x --cases fast --json "$out/gpu-sd1-esd-x-1000.json"
bench --random-weights sd1 --resolution 512 --iterations 4 --sample-steps 10 --json "$out/gpu-sd1-512-memory.json"
bench --random-weights sdxl --resolution 1024 --iterations 4 --sample-steps 10 --cases fast two-unet --json "$out/gpu-sdxl-1024-memory.json"
date +%T
