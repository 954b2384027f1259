// v1 configurations 33 and up: the M <= 16 x ring at 3 blocks per SM (16-row blocks, 80 registers), as 23-25 do at
// M <= 8: tall grids at M 9-16 ran 1.3-2.6 waves of 2-block SMs. 33 keeps each warp's sums in its x ring (kRedInRing)
// so that three 3-slot rings fit an SM; 34 has 2 slots and the static sums. Their own translation unit.
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_m16_3blk(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                        cudaStream_t s) {
  switch (cfg) {
    case 33: return launch_v1_ring<T, 2, V1Cfg<1, true, 3, 3, 16, 1, false, false, kWarps, true>>(op, x, bias, out, M, s);
    case 34: return launch_v1_ring<T, 2, V1Cfg<1, true, 3, 2, 16>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_m16_3blk(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                   cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_m16_3blk<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_m16_3blk<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
