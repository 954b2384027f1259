# Hardware-counter profile of the fused kernel (M = 1, 4096x4096, 1 % ortho) with ncu, on the GPU machine.
# LIBORTHO_DECODE_KERNEL=v1|v2|v3 picks the variant profiled.
export PYTHONPATH=$PWD/src LIBORTHO_BUILD_DIR=$PWD/.torch_extensions
OUT=${OUT:-/tmp/out}
python3 benchmarks/check_errors.py 2>&1 | tail -3
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
$NCU --clock-control none -k regex:'fused_small_m|decode_kernel|gemv_v3' --launch-skip 2 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats python3 benchmarks/ncu_case.py 0.01 > $OUT/ncu.txt 2>&1
grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Stall|Registers|Theoretical Occ|Eligible|Issued Warp|alpha|==PROF==" $OUT/ncu.txt | head -60
python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py 2>&1 | tail -5
