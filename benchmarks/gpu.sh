#!/usr/bin/env bash
# The width grid (benchmarks/width_grid.py) on CUDA, for the day a GPU machine is lent:
#   bash benchmarks/gpu.sh            # dims 512, 256, 1024 x 8 layers; writes benchmarks/gpu_results.json (+ .md)
#   bash benchmarks/gpu.sh --quick    # a smoke run (few tokens); extra arguments go to width_grid.py
# Training and decoding run on cuda; the CPU results (benchmarks/width_grid.json, results.json) are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if [ -z "${EASE_DATA_DIR:-}" ]; then
    for dir in ../shared/data/wikitext-2 shared/data/wikitext-2; do
        if [ -f "$dir/wiki.valid.tokens" ]; then export EASE_DATA_DIR="$(cd "$dir" && pwd)"; break; fi
    done
fi
: "${EASE_DATA_DIR:?set EASE_DATA_DIR to the WikiText-2 folder (wiki.train.tokens, wiki.valid.tokens)}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" benchmarks/width_grid.py --device cuda --chars 200000 --chars-1024 200000 \
    --out benchmarks/gpu_results.json --no-merge "$@"
