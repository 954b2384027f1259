// Host-only check (no GPU): CUTLASS's reordered INT4 layout for a Hopper register-A operand, with four k16 atoms per
// thread and the tiles K-innermost, puts every (n, k) of W at the nibble where libortho.quant.pack puts it. If so,
// CUTLASS's mixed-input mainloop can read LibOrtho's packed weights without a converted copy (see
// cutlass_mixed_gemm.cu, which runs the GEMM on that layout).
// pack()'s rule, as decoded here (checked against quant.pack in Python): tile (n/16, k/64) of 1024 nibbles; lane
// (r%8)*4 + (c%8)/2 owns nibbles 32 lane .. 32 lane + 31; step c/16 is its word; in the word, nibble
// (c%2)*4 + r/8 + 2 ((c%16)/8)   (r = n % 16, c = k % 64).
// Build and run (C = the nvidia-cutlass wheel's cutlass_library/source; CUTLASS's utility header pulls in
// curand_kernel.h, which a toolkit without cuRAND lacks: the nvidia-curand wheel's nvidia/cu13/include has it):
//   nvcc -std=c++17 --expt-relaxed-constexpr -I$C/include -I$C/tools/util/include [-I$CURAND/include] \
//        benchmarks/probes/cutlass_layout_check.cu -o /tmp/clc && /tmp/clc
#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"

using namespace cute;
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
using AtomOurs = decltype(cutlass::compute_memory_reordering_atom<cutlass::bfloat16_t, Layout<Shape<_1, _4>>, ValueShuffle>());

// The same atom written out as gemm_cutlass.cu writes it (pack()'s rule as a CuTe layout): the types must agree.
using PackedTile = Layout<Shape<Shape<Shape<_8, _2>, _1>, Shape<Shape<_2, _4, _2>, _4>>,
                          Stride<Stride<Stride<_128, _1>, _0>, Stride<Stride<_4, _32, _2>, _8>>>;
static_assert(std::is_same_v<PackedTile, AtomOurs>, "gemm_cutlass.cu's PackedTile is not CUTLASS's atom");

long pack_offset(int n, int k, int K) {
  const int r = n % 16, c = k % 64, tk = K / 64;
  const int lane = (r % 8) * 4 + (c % 8) / 2, step = c / 16, slot = (c % 2) * 4 + r / 8 + 2 * ((c % 16) / 8);
  return (long(n / 16) * tk + k / 64) * 1024 + lane * 32 + step * 8 + slot;
}

int main() {
  const int shapes[][2] = {{16, 64}, {32, 256}, {48, 640}, {1024, 4096}, {4096, 1024}};
  int failed = 0;
  for (auto& sh : shapes) {
    const int N = sh[0], K = sh[1];
    const auto layout = tile_to_shape(AtomOurs{}, make_shape(N, K, 1), Step<_2, _1, _3>{});
    long same = 0;
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < K; ++k) same += long(layout(n, k, 0)) == pack_offset(n, k, K);
    std::printf("%dx%d: %ld of %ld offsets identical\n", N, K, same, long(N) * K);
    failed += same != long(N) * K;
  }
  return failed;
}
