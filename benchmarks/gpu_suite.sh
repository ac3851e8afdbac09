#!/usr/bin/env bash
# The prepared GPU run (one call on the device machine, about 8 minutes on one H100/H200; --time_budget (default
# 450 s) skips or stops what would run past it, so the summary always prints):
#   bash benchmarks/gpu_suite.sh
# The device image has torch, torchvision, transformers, accelerate, peft and tensorboard but no diffusers, and no
# network: `make gpu-wheels` puts the wheels it lacks and a copy of diffusers' script (../shared does not travel)
# in .gpu-wheels/ here, which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=""
if [ -d .gpu-wheels ]; then  # beside the image's packages, not into them (its environment may be read-only)
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu-wheels/*.whl
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT_DIR=${OUT:-outputs}/gpu-suite
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" benchmarks/gpu_suite.py --output_dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
