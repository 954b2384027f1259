#!/usr/bin/env bash
# On the GPU machine after SmolLM2 staging: the utility experiment, outputs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site LIBORTHO_DATA=$PWD/.data LIBORTHO_BUILD_DIR=$PWD/.torch_extensions
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m libortho.eval.utility --device cuda --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/utility.log" | grep -v "it/s\]" | tail -60
