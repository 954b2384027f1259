#!/usr/bin/env bash
# One device call: end-to-end decode benchmark (issue #5), bf16 vs LibOrtho alpha=1/0 vs torch int4.
# Usage (repo root, on the GPU machine, SmolLM2 staged under /tmp/site, see /work/shared/GPU.md):
#   PYTHONPATH=$PWD/src:/tmp/site bash benchmarks/gpu_decode.sh                      # both models (~5 min)
#   MODELS=smollm2 bash benchmarks/gpu_decode.sh        MODELS=llama2-7b-shape bash benchmarks/gpu_decode.sh
#   SKIP_TESTS=1 ... (skip the GPU tests of the harness)   extra args go to the benchmark, e.g. --reps 5
# Writes $OUT/decode-<card>.json and .md (copy them to benchmarks/results/), logs under $OUT; until the run
# ends, decode-<card>.partial.json holds every measurement so far (what a time limit leaves).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/card.txt"
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '-'))")
t0=$(date +%s)
python3 -m libortho.cli build-kernels 2>&1 | tail -30
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the GPU-only tests of the harness: no host sync in a decode step, graph == eager, reference capturable, int4
  python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_bench_decode.py -k "cuda" 2>&1 \
    | tee "$OUT/test_bench_decode.log" | tail -25
fi
SUFFIX=${MODELS:+-$(echo "$MODELS" | tr ' ' '+')}
t1=$(date +%s)
python3 -m libortho.eval.bench_decode --models ${MODELS:-smollm2 llama2-7b-shape} \
  --out "$OUT/decode-$CARD$SUFFIX.json" "$@" 2>&1 | tee "$OUT/bench_decode$SUFFIX.log" \
  | tr '\r' '\n' | grep -v -E '[0-9]+/[0-9]+ \[' | tail -80   # progress bars stay in the log only
echo "bench decode: $(( $(date +%s) - t1 )) s, total $(( $(date +%s) - t0 )) s"
