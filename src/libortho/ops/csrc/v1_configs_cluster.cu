// v1 configurations 33-37: 10, 12, 22, 32 and 31 with x shared by clusters of two blocks (V1Cfg::kClusterX; every
// block reads all of x through its ring, at M = 16 twice its weight bytes, at M = 64 eight times). Lean forms only;
// a call they cannot take runs the twin. Their own translation unit (built in parallel).
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t fused_cfg_dispatch_cluster(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                       cudaStream_t s) {
  constexpr bool C = true;
  switch (cfg) {
    case 33: return launch_v1_cluster<T, 2, V1Cfg<1, true, 2, 4, 16, 1, false, false, kWarps, false, C>>(op, x, bias, out, M, s, 10);
    case 34: return launch_v1_cluster<T, 2, V1Cfg<1, true, 2, 3, 16, 2, false, false, kWarps, false, C>>(op, x, bias, out, M, s, 12);
    case 35: return launch_v1_cluster<T, 2, V1Cfg<1, true, 1, 3, 16, 2, false, false, 16, false, C>>(op, x, bias, out, M, s, 22);
    case 36: return launch_v1_cluster<T, 4, V1Cfg<1, true, 1, 4, 32, 2, false, false, kWarps, true, C>>(op, x, bias, out, M, s, 32);
    case 37: return launch_v1_cluster<T, 8, V1Cfg<1, true, 1, 2, 64, 2, false, false, kWarps, true, C>>(op, x, bias, out, M, s, 31);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_v1_cfg_cluster(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                  cudaStream_t s) {
  return op.bf16 ? fused_cfg_dispatch_cluster<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : fused_cfg_dispatch_cluster<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
