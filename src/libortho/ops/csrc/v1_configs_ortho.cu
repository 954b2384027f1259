// v1 configurations 33 and up (see v1_configs.cu): the table's ring configurations with warps of their own for the
// ortho stream (V1Cfg::kOrthoWarps), which then runs beside the base sweep. Their own translation unit (built in
// parallel).
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_ortho(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                     cudaStream_t s) {
  switch (cfg) {
    // short grids, M <= 4 (as 16, after the sweep) with 2 or 4 ortho warps; M <= 8 (as 9 at 2 blocks per SM) with 2
    case 33: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 4, 1, false, false, kWarps, false, 2>>(op, x, bias, out, M, s);
    case 34: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 4, 1, false, false, kWarps, false, 4>>(op, x, bias, out, M, s);
    case 35: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 8, 1, false, false, kWarps, false, 2>>(op, x, bias, out, M, s);
    // tall grids, M <= 4 (as 25: 32 rows): 1 ortho warp at 3 blocks per SM, 2 at 2
    case 36: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 3, 4, 2, false, false, kWarps, false, 1>>(op, x, bias, out, M, s);
    case 37: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 3, 4, 2, false, false, kWarps, false, 2>>(op, x, bias, out, M, s);
    // long-K short grids (as 20: 16 warps of 32 rows) and grids of fewer row tiles than SMs (as 18: 12 warps), M <= 8
    case 38: return launch_v1_ring<T, 1, V1Cfg<1, true, 1, 4, 8, 2, false, false, 16, false, 2>>(op, x, bias, out, M, s);
    case 39: return launch_v1_ring<T, 1, V1Cfg<1, true, 2, 4, 8, 1, false, false, 12, false, 2>>(op, x, bias, out, M, s);
    // M <= 16: as 10 (16 rows) and 12 (32 rows), with 2 ortho warps
    case 40: return launch_v1_ring<T, 2, V1Cfg<1, true, 2, 4, 16, 1, false, false, kWarps, false, 2>>(op, x, bias, out, M, s);
    case 41: return launch_v1_ring<T, 2, V1Cfg<1, true, 2, 3, 16, 2, false, false, kWarps, false, 2>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_ortho(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_ortho<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_ortho<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
