#!/usr/bin/env bash
# The GPU check a developer with a CUDA machine runs once (about 8 minutes on one H100):
#   1. the opt-in GPU tests (tests/gpu: tiny model on CUDA through a real server, batching
#      keeps images, the benchmark on the SDXL architecture with random weights);
#   2. bench/gpu_throughput.py for SDXL and FLUX.1-schnell at 1024x1024: plain diffusers loop
#      vs impasto with 1 and 8 clients, with issue 7's targets beside the numbers.
# Installs nothing: run ./scripts/install first, with the CUDA torch you want already in .venv.
# Random weights are saved under $IMPASTO_BENCH_CACHE (default ~/.cache/impasto-bench, ~45 GB)
# and reused by later runs; pass real weights with e.g. `--sdxl-path DIR --flux-path DIR`.
#
#   bench/gpu_check.sh [extra gpu_throughput.py options]     IMAGES=16 bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=.venv/bin/python
export IMPASTO_BENCH_CACHE="${IMPASTO_BENCH_CACHE:-$HOME/.cache/impasto-bench}"
export HF_HUB_OFFLINE=1

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (install a CUDA build of torch into .venv)" >&2
    exit 1
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"

started=$SECONDS
echo "== GPU tests (tests/gpu)"
IMPASTO_GPU_TESTS=1 "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider
tests_s=$((SECONDS - started))

echo "== throughput: SDXL and FLUX.1-schnell, plain diffusers vs impasto"
"$PYTHON" bench/gpu_throughput.py --arch sdxl,flux --images "${IMAGES:-8}" \
    --json bench/results/gpu_throughput.json "$@"

echo "gpu_check: tests ${tests_s} s, total $((SECONDS - started)) s;" \
    "results in bench/results/gpu_throughput.json"
