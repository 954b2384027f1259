// v1 configurations 33 and up: the M <= 8 and M <= 16 ring forms with each warp's partial sums kept in its own x ring
// after its sweep (kRedInRing, as 31-32 do at M 17-64). The static sums array they drop (9-35 KB a block) buys one
// more ring slot where shared memory set the slot count. Their own translation unit (built in parallel).
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_red(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                   cudaStream_t s) {
  switch (cfg) {
    // M <= 16: 10 with a 5th slot (105 KB of ring, 2 blocks per SM), 12 with a 4th (32 rows, 102 KB, 2 blocks),
    // 22 with a 4th (16 warps, 32 rows, 205 KB, 1 block)
    case 33: return launch_v1_ring<T, 2, V1Cfg<1, true, 2, 5, 16, 1, false, false, kWarps, true>>(op, x, bias, out, M, s);
    case 34: return launch_v1_ring<T, 2, V1Cfg<1, true, 2, 4, 16, 2, false, false, kWarps, true>>(op, x, bias, out, M, s);
    case 35: return launch_v1_ring<T, 2, V1Cfg<1, true, 1, 4, 16, 2, false, false, 16, true>>(op, x, bias, out, M, s);
    // M <= 8: 20 with a 5th slot (16 warps, 32 rows, 174 KB, 1 block)
    case 36: return launch_v1_ring<T, 1, V1Cfg<1, true, 1, 5, 8, 2, false, false, 16, true>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_red(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                              cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_red<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_red<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
