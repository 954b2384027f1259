#!/usr/bin/env bash
# Source-level ncu profile of v1 at M = 1, $DENSITY ortho (default 1 %): alpha 0 and alpha 1 (one launch each) per shape, on the
# GPU machine (SHAPES="NxK ...", default 4096x11008 11008x4096). Builds with -lineinfo; writes
# $OUT/src_<shape>.csv (stall samples per SASS instruction) and $OUT/details_<shape>.txt. Summarize with: python benchmarks/ncu_top.py $OUT/src_4096x11008.csv
ROOT=$PWD; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LIBORTHO_BUILD_DIR=${LIBORTHO_BUILD_DIR:-$ROOT/.torch_extensions} PYTHONPATH=$ROOT/src:${PYTHONPATH:-} LIBORTHO_NVCC_FLAGS=-lineinfo
t0=$(date +%s)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
python3 -c "from libortho.ops import cuda; print('build ok' if cuda.build() else cuda._state['error'])"
echo "build: $(( $(date +%s) - t0 )) s"
for tag in ${SHAPES:-4096x11008 11008x4096}; do
  shape=${tag/x/ }
  timeout 150 $NCU --clock-control none -k regex:fused_small_m --launch-skip 2 --launch-count 2 \
    --section SpeedOfLight --section WarpStateStats --section SourceCounters --section SchedulerStats --section Occupancy \
    --import-source yes --print-details all -o $OUT/rep_$tag python3 benchmarks/ncu_case.py ${DENSITY:-0.01} $shape > $OUT/ncu_$tag.txt 2>&1
  $NCU -i $OUT/rep_$tag.ncu-rep --print-details all > $OUT/details_$tag.txt 2>&1
  $NCU -i $OUT/rep_$tag.ncu-rep --page source --csv --print-source sass > $OUT/src_$tag.csv 2>$OUT/src_$tag.err
  echo "$tag: $(wc -c < $OUT/src_$tag.csv) bytes of source csv; $(( $(date +%s) - t0 )) s"
  grep -E "Duration|Warp Cycles Per Issued|Issued Warp|Stall|stall" $OUT/details_$tag.txt | head -40
done
cd $OUT && tar czf ncu.tgz *.txt *.csv *.err && rm -f *.ncu-rep && ls -la
