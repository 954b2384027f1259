#!/usr/bin/env bash
# GPU machine: build and run benchmarks/probes/cutlass_mixed_gemm.cu (CUTLASS's Hopper INT4 x bf16 GEMM against cuBLAS
# bf16, one process). CUTLASS comes from the nvidia-cutlass wheel, carried (no network there):
#   here:   python3 -m pip download --no-deps nvidia-cutlass==4.2.0.0 -d .deps
#   there:  run(carry=[".deps"], command="bash benchmarks/probes/cutlass_mixed_gemm.sh 64 512 2048")
# Writes $OUT/cutlass-mixed-gemm.jsonl (one object per shape, M and configuration) and the build log.
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; t0=$(date +%s)
whl=$(ls .deps/nvidia_cutlass-*.whl | head -1)
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/cutlass_whl')" "$whl"
C=/tmp/cutlass_whl/cutlass_library/source
# cuBLAS and cuRAND headers: the toolkit's, else the pip wheels' (nvidia/cu13/include)
INC=$(python3 -c "import glob, os, nvidia; print(' '.join('-I' + d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'include'))))" 2>/dev/null || true)
LIBDIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'lib'))))" 2>/dev/null || true)
# the toolkit's libcublas.so, else the wheel's versioned one (wheels ship no unversioned link)
CUBLAS=$(ls /usr/local/cuda/lib64/libcublas.so 2>/dev/null || (IFS=:; for d in $LIBDIRS; do ls "$d"/libcublas.so.* 2>/dev/null; done) | head -1)
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
echo "nvcc $NVCC, cuBLAS $CUBLAS, includes $INC"
$NVCC -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I$C/include \
  -I$C/tools/util/include $INC ${EXTRA_INC:-} benchmarks/probes/cutlass_mixed_gemm.cu ${CUBLAS:+"$CUBLAS"} -o /tmp/cmg > "$OUT/cutlass-build.log" 2>&1 \
  || { tail -20 "$OUT/cutlass-build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
LD_LIBRARY_PATH=$LIBDIRS:${LD_LIBRARY_PATH:-} /tmp/cmg "$@" | tee "$OUT/cutlass-mixed-gemm.jsonl"
echo "total $(( $(date +%s) - t0 )) s"
