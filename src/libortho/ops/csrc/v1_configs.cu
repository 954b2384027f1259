// The v1 tuning configurations (INT4, M <= 16): index -> kernel instantiation. Its own translation unit so
// that these instantiations compile in parallel with the rest.
#include "v1.cuh"

namespace libortho {
namespace {

// The v1 configurations the tuning probe times (INT4; largest M: kV1CfgMaxM): index -> V1Cfg.
template <typename T>
cudaError_t fused_cfg_dispatch(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                               cudaStream_t s) {
  if (op.bits != 4 || cfg < 0 || cfg >= kV1Cfgs || M > kV1CfgMaxM[cfg]) return cudaErrorInvalidValue;
  switch (cfg) {
    case 0: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<2, true, 2>>, op, x, bias, out, M, s);  // short grids
    case 1: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 3>>, op, x, bias, out, M, s);  // tall grids
    case 2: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 2>>, op, x, bias, out, M, s);
    // weights through a per-warp shared-memory ring (ring_sweep)
    case 3: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 2, 6>>, op, x, bias, out, M, s);
    case 4: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 3, 6>>, op, x, bias, out, M, s);
    case 5: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 3, 4>>, op, x, bias, out, M, s);
    // M <= 16 (two n8 column blocks): the default, and the ring
    case 6: return launch_v1<T>(fused_small_m_kernel<T, 4, 2, V1Cfg<1, true, 2>>, op, x, bias, out, M, s);
    case 7: return launch_v1<T>(fused_small_m_kernel<T, 4, 2, V1Cfg<1, true, 2, 5>>, op, x, bias, out, M, s);  // 6 slots: > 48 KB static
    // M <= 4: the 4-slot ring with x's columns in it (ldmatrix)
    case 8: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 4, 4>>(op, x, bias, out, M, s);
    // the x ring for M <= 8 and M <= 16 (dynamic shared memory: 51 / 84 KB of ring per block)
    case 9: return launch_v1_ring<T, 1, V1Cfg<1, true, 3, 4, 8>>(op, x, bias, out, M, s);
    case 10: return launch_v1_ring<T, 2, V1Cfg10>(op, x, bias, out, M, s);
    default: return launch_v1_cfg_hi(op, x, bias, out, M, cfg, s);  // v1_configs_hi.cu
  }
}

}  // namespace

cudaError_t launch_fused_small_m_cfg(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                     cudaStream_t stream) {
  if (M < 1 || op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? fused_cfg_dispatch<__nv_bfloat16>(op, x, bias, out, M, cfg, stream)
                 : fused_cfg_dispatch<__half>(op, x, bias, out, M, cfg, stream);
}

}  // namespace libortho
