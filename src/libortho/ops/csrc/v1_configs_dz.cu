// v1 tuning configurations 17 and up: the table's configurations 16, 15, 14, 11, 10 and 12 with the zero point
// deferred (V1Cfg::kDeferZero). Their own translation unit, built in parallel with the others.
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_dz(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                  cudaStream_t s) {
  switch (cfg) {
    case 17: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 2, 4, 4, 1, true, true>>, op, x, bias, out, M, s);
    case 18: return launch_v1_dyn<T, 1, V1Cfg<1, true, 2, 4, 8, 2, true, true>>(op, x, bias, out, M, s);
    case 19: return launch_v1_dyn<T, 1, V1Cfg<1, true, 3, 4, 8, 1, true, true>>(op, x, bias, out, M, s);
    case 20: return launch_v1_dyn<T, 1, V1Cfg<1, true, 2, 4, 8, 2, false, true>>(op, x, bias, out, M, s);
    case 21: return launch_v1_dyn<T, 2, V1Cfg<1, true, 2, 4, 16, 1, false, true>>(op, x, bias, out, M, s);
    case 22: return launch_v1_dyn<T, 2, V1Cfg<1, true, 2, 3, 16, 2, false, true>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_dz(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                             cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_dz<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_dz<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
