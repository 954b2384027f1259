// Host check (built and run by .ci/run where nvcc exists; no GPU needed): the launcher's lean test
// (v1_lean_ok) takes its group condition from the kernel's own GroupIndex and ring_pstep. They must accept
// exactly the group sizes the ring can sweep: one group per row (gs >= K), or a power of two that is a
// multiple of 64 and divides a warp's step of W * 64 columns.
#include <cstdio>

#include "../../src/libortho/ops/csrc/v1.cuh"

using namespace libortho;

template <int W>
int mismatches() {
  int bad = 0, n = 0;
  for (int K = 64; K <= 20000; K += 64)
    for (int gs = 1; gs <= 2 * K + 64; gs += gs < 300 ? 1 : 7) {
      const bool spec = gs >= K || (gs % 64 == 0 && (gs & (gs - 1)) == 0 && (W * 64) % gs == 0);
      const GroupIndex gi(gs, K);
      const bool got = gi.same && ring_pstep<W>(gi) >= 0;
      if (spec != got && bad++ < 5) std::printf("W=%d K=%d group %d: spec %d, kernel's %d\n", W, K, gs, spec, got);
      ++n;
    }
  std::printf("ring groups, %d warps: %d cases, %d mismatches\n", W, n, bad);
  return bad;
}

int main() { return mismatches<8>() + mismatches<12>() + mismatches<16>() == 0 ? 0 : 1; }
