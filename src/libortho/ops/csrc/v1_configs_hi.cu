// v1 tuning configurations 11 and up (see v1_configs.cu): their own translation unit, so that they compile in
// parallel with configurations 0-10.
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_hi(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                  cudaStream_t s) {
  switch (cfg) {
    // two row tiles (32 output rows) per block from one x ring: 70 / 77 KB of ring per block
    case 11: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 8, 2>>(op, x, bias, out, M, s);
    case 12: return launch_v1_ring<T, 2, V1Cfg12>(op, x, bias, out, M, s);
    // the ortho stream first, while the ring's first tiles are in flight: configurations 8, 9 and 11 so (13-14: 14
    // bytes of spills at 80 registers)
    case 13: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 4, 4, 1, true>>(op, x, bias, out, M, s);
    case 14: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 4, 8, 1, true>>(op, x, bias, out, M, s);
    case 15: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 8, 2, true>>(op, x, bias, out, M, s);
    case 16: return launch_v1_ring<T, 1, V1Cfg16>(op, x, bias, out, M, s);  // 13 at 2 blocks per SM: no spills
    // other warp counts (lean only; v1.cuh kBlockWarps): 12 warps at 2 blocks per SM (8, 9 and 16 so),
    // 16 warps of 32 rows at 1 block per SM (11, 15 and 12 so)
    case 17: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 4, 1, false, false, 12>>(op, x, bias, out, M, s);
    case 18: return launch_v1_ring<T, 1, V1Cfg18>(op, x, bias, out, M, s);
    case 19: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 4, 1, true, false, 12>>(op, x, bias, out, M, s);
    case 20: return launch_v1_ring<T, 1, V1Cfg20>(op, x, bias, out, M, s);
    case 21: return launch_v1_ring<T, 1, V1Cfg<1, true, 1, 4, 8, 2, true, false, 16>>(op, x, bias, out, M, s);
    case 22: return launch_v1_ring<T, 2, V1Cfg22>(op, x, bias, out, M, s);
    // 32 rows at 3 blocks per SM (tall grids: 344 blocks of 11008 rows in one wave of 396 slots instead of 1.3
    // of 264): 80 registers, the lean forms spill 4-8 bytes outside the sweep; rings of 40-53 KB
    case 23: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 4, 4, 2>>(op, x, bias, out, M, s);
    case 24: return launch_v1_ring<T, 1, V1Cfg24>(op, x, bias, out, M, s);
    case 25: return launch_v1_ring<T, 1, V1Cfg25>(op, x, bias, out, M, s);
    default: return launch_v1_cfg_m32(op, x, bias, out, M, cfg, s);  // v1_configs_m32.cu
  }
}

}  // namespace

cudaError_t launch_v1_cfg_hi(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                             cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_hi<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_hi<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
