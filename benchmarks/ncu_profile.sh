# Hardware-counter profile at M = 1 (1 % ortho) with ncu, on the GPU machine: the LibOrtho decode kernels
# (v1 and v3, alpha 0 and 1), torch's int4 kernel and bf16 F.linear, for 4096x4096 and 11008x4096.
# Usage: OUT=/tmp/out bash benchmarks/ncu_profile.sh   (prints the key lines; full reports in $OUT/ncu-*.txt)
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$PWD/.torch_extensions}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
python3 -c "from libortho.ops import cuda; print('build ok' if cuda.build() else cuda._state['error'])"
for shape in "4096 4096" "11008 4096"; do
  for v in v1 v3; do
    f="$OUT/ncu-${v}-${shape// /x}.txt"
    # only the products (the layer's packing and sieve run kernels too): 3 calls each of alpha 0, alpha 1,
    # torch's int4 kernel and bf16 F.linear
    LIBORTHO_DECODE_KERNEL=$v $NCU --clock-control none -k regex:"fused_small_m|gemv_v3|tinygemm|gemv|gemm" \
      --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section WarpStateStats --section LaunchStats --section SchedulerStats \
      python3 benchmarks/ncu_case.py 0.01 $shape > "$f" 2>&1
    echo "== $v $shape"
    grep -E "^  [A-Za-z_].*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Warp Cycles Per Issued|Stall Long Scoreboard|Grid Size" "$f" | head -80
  done
done
