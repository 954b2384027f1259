// v1 configurations for M 17-32 and 33-64 (26 and up, see v1_configs.cu): the x ring with four or eight n8 column
// blocks. Above M = 16 the default path is a GEMM (gemm_sm90.cu), which at M = 32 runs a K step of a block in lock
// step (~1000 cycles a 64-column chunk, 34 us for any N at K = 4096) and stays slower than bf16 there; these carry
// the ring that serves M <= 16 at 2.1-2.9x bf16 to wider batches. Their own translation unit (built in parallel).
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_m32(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                   cudaStream_t s) {
  switch (cfg) {
    // M <= 32 (x ring of 32 rows, 4 KB a tile): 16 rows and 4 slots (150 KB of ring), 32 rows and 3 slots (126 KB),
    // 16 rows and 2 slots at 2 blocks per SM (75 KB), 16 rows and 3 slots (112 KB)
    case 26: return launch_v1_ring<T, 4, V1Cfg<1, true, 1, 4, 32>>(op, x, bias, out, M, s);
    case 27: return launch_v1_ring<T, 4, V1Cfg<1, true, 1, 3, 32, 2>>(op, x, bias, out, M, s);
    case 28: return launch_v1_ring<T, 4, V1Cfg<1, true, 2, 2, 32>>(op, x, bias, out, M, s);
    case 29: return launch_v1_ring<T, 4, V1Cfg<1, true, 1, 3, 32>>(op, x, bias, out, M, s);
    // M <= 64 (8 KB of x a tile): 16 rows and 2 slots (140 KB)
    case 30: return launch_v1_ring<T, 8, V1Cfg<1, true, 1, 2, 64>>(op, x, bias, out, M, s);
    // the sums in each warp's x ring after its sweep (kRedInRing), which frees 33-66 KB of static shared memory: M <= 64
    // with 32 rows and 2 slots (146 KB of ring), M <= 32 with 32 rows and 4 slots (164 KB)
    case 31: return launch_v1_ring<T, 8, V1Cfg<1, true, 1, 2, 64, 2, false, false, kWarps, true>>(op, x, bias, out, M, s);
    case 32: return launch_v1_ring<T, 4, V1Cfg<1, true, 1, 4, 32, 2, false, false, kWarps, true>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_m32(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                              cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_m32<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_m32<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
