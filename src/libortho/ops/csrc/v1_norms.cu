// v1's RMSNorm epilogues (libortho.norms: NormOperands, M <= 16) as instantiations of their own: the
// default table's configurations at M <= 16 and, for other widths, the default configuration. Its own translation
// unit, so that these compile in parallel with the rest and the kernels without the epilogues stay as they were.
#include "v1.cuh"

namespace libortho {
namespace {

template <typename T>
cudaError_t norm_cfg_dispatch(const NormOperands& op, const void* x, const void* bias, void* out, int M, int cfg,
                              cudaStream_t s) {
  switch (cfg) {
    case 10: return launch_v1_ring<T, 2, V1Cfg10, true>(op, x, bias, out, M, s);
    case 12: return launch_v1_ring<T, 2, V1Cfg12, true>(op, x, bias, out, M, s);
    case 16: return launch_v1_ring<T, 1, V1Cfg16, true>(op, x, bias, out, M, s);
    case 18: return launch_v1_ring<T, 1, V1Cfg18, true>(op, x, bias, out, M, s);
    case 20: return launch_v1_ring<T, 1, V1Cfg20, true>(op, x, bias, out, M, s);
    case 22: return launch_v1_ring<T, 2, V1Cfg22, true>(op, x, bias, out, M, s);
    case 24: return launch_v1_ring<T, 1, V1Cfg24, true>(op, x, bias, out, M, s);
    case 25: return launch_v1_ring<T, 1, V1Cfg25, true>(op, x, bias, out, M, s);
    default: return cudaErrorNotSupported;
  }
}

template <typename T>
cudaError_t norm_dispatch(const NormOperands& op, const void* x, const void* bias, void* out, int M, int cfg,
                          cudaStream_t s) {
  if (op.bits == 4) return norm_cfg_dispatch<T>(op, x, bias, out, M, cfg, s);
  return with_bits(op.bits, [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    if constexpr (BITS == 4) return cudaErrorNotSupported;  // (taken above; no second set of kernels)
    auto kernel = M <= 8 ? fused_small_m_kernel<T, BITS, 1, V1Default<1>, false, true>
                         : fused_small_m_kernel<T, BITS, 2, V1Default<2>, false, true>;
    return launch_v1<T>(kernel, op, x, bias, out, M, s);
  });
}

}  // namespace

cudaError_t launch_v1_norm(const NormOperands& op, const void* x, const void* bias, void* out, int M, int cfg,
                           cudaStream_t s) {
  if (M < 1 || M > 16 || op.K % 16 != 0 || op.N % 16 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? norm_dispatch<__nv_bfloat16>(op, x, bias, out, M, cfg, s)
                 : norm_dispatch<__half>(op, x, bias, out, M, cfg, s);
}

}  // namespace libortho
