// The large-M base product by CUTLASS's Hopper mixed-input GEMM (sm_90a, built only with LIBORTHO_WITH_CUTLASS and
// CUTLASS's headers; ops/cuda.py finds them in the nvidia-cutlass wheel or $LIBORTHO_CUTLASS_DIR). It reads the
// packed INT4 tiles as they are: CUTLASS's reordered layout for a register-A operand with four k16 atoms per
// thread, tiled K-innermost, is libortho.quant.pack's layout nibble for nibble (benchmarks/probes/
// cutlass_layout_check.cu). The weights are CUTLASS's A operand (converted in registers before wgmma), the tokens
// its B: out^T (N, M) = W x^T, written column-major, i.e. out (M, N) row-major. Scales and zeros go in CUTLASS's
// (G, N) form, zeros additive (w = s q + z', z' = -z s), built per call by a small kernel into the caller's
// workspace. CUTLASS rounds s q, then s q + z' (two roundings where the dequantize step rounds (q - z) s once).
#include "common.cuh"
#include "kernels.h"

#if LIBORTHO_WITH_CUTLASS
#ifndef NDEBUG
#define NDEBUG  // device asserts are calls, and ptxas serializes the wgmmas around calls (C7510)
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace libortho {
namespace {

using namespace cute;
constexpr int kTileK = 64;  // a packed tile's columns; groups must be whole tiles

using StrideW = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
// One packed 16x64 tile as a CuTe layout, (row, column) -> nibble: quant.py's rule (lane (r%8)*4 + (c%8)/2, 32
// nibbles a lane; word c/16; in the word (c%2)*4 + r/8 + 2 ((c%16)/8)). It is the type CUTLASS's
// compute_memory_reordering_atom gives for 16-bit MMA, four k16 atoms per thread and value order 0,2,4,6,1,3,5,7
// (benchmarks/probes/cutlass_layout_check.cu checks both).
using PackedTile = Layout<Shape<Shape<Shape<_8, _2>, _1>, Shape<Shape<_2, _4, _2>, _4>>,
                          Stride<Stride<Stride<_128, _1>, _0>, Stride<Stride<_4, _32, _2>, _8>>>;

// The two forms (tile = weight rows x tokens), chosen per call (kernels.h kCutlassForms): cooperative 128x128 tiles,
// the faster one where its tiles fill the SMs' waves, and ping-pong 64x128 (two consumer warpgroups on two tiles:
// twice the tiles, a shorter pass per wave), the faster one on short grids (H200: results/cutlass-tiles-H200.json).
struct Coop128 {
  using Tile = Shape<_128, _128, Int<kTileK>>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpiSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct Ping64 {
  using Tile = Shape<_64, _128, Int<kTileK>>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using EpiSchedule = cutlass::epilogue::TmaWarpSpecialized;
};

template <class Act, class Form>
struct CutlassGemm {
  using Atom = PackedTile;
  using LayoutW = decltype(tile_to_shape(Atom{}, Layout<Shape<int, int, int>, StrideW>{}, Step<_2, _1, _3>{}));
  using Tile = typename Form::Tile;
  using Cluster = Shape<_1, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, 8, Act,
      cutlass::layout::ColumnMajor, 8, typename Form::EpiSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<cutlass::uint4b_t, Act, Act>, LayoutW, 32, Act,
      cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Form::Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const Operands& op, const void* x, void* out, int M, const void* s2,
                                            const void* z2) {
    using StrideX = typename Gemm::GemmKernel::StrideB;
    using StrideS = typename Mainloop::StrideScale;
    using StrideOut = typename Gemm::GemmKernel::StrideD;
    const int G = (op.K + op.group_size - 1) / op.group_size;
    // packed strides: x (M, K) K-major, scales (N, G) N-major, out^T (N, M) N-major (one batch)
    const StrideX sx = make_stride(int64_t{op.K}, Int<1>{}, int64_t{M} * op.K);
    const StrideS ss = make_stride(Int<1>{}, int64_t{op.N}, int64_t{op.N} * G);
    const StrideOut so = make_stride(Int<1>{}, int64_t{op.N}, int64_t{op.N} * M);
    const LayoutW lw = tile_to_shape(Atom{}, make_shape(op.N, op.K, 1), Step<_2, _1, _3>{});
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {op.N, M, op.K, 1},
            {reinterpret_cast<const cutlass::uint4b_t*>(op.qweight), lw, static_cast<const Act*>(x), sx,
             static_cast<const Act*>(s2), ss, op.group_size, static_cast<const Act*>(z2)},
            {{1.f, 0.f}, nullptr, so, static_cast<Act*>(out), so}};
  }
};

// s2, z2 (G, N) = scales, -zeros * scales from the packed (N/16, G, 16) form (zeros absent: 2^(bits-1)). One thread
// per (row, group), groups on the grid's y: 32-bit indices and no division (the 64-bit i / N, i % N of a flat loop
// cost 1.6-3.6 us a call, results/cutlass-prof-H200.json). A warp reads two 32-byte runs and writes 64 bytes.
template <typename T>
__global__ void cutlass_params_kernel(const T* __restrict__ sc, const T* __restrict__ zp, T* __restrict__ s2,
                                      T* __restrict__ z2, int N, int G, float zdef) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, g = blockIdx.y;
  if (n >= N) return;
  const int src = ((n >> 4) * G + g) * 16 + (n & 15), dst = g * N + n;  // < N * G < 2^31 (the launcher checks)
  const float s = Num<T>::f(sc[src]), z = zp ? Num<T>::f(zp[src]) : zdef;  // torch builds without implicit conversions
  s2[dst] = Num<T>::from(s);
  z2[dst] = Num<T>::from(-z * s);
}

constexpr size_t kAlign = 256;
size_t round_up(size_t b) { return (b + kAlign - 1) / kAlign * kAlign; }
size_t params_bytes(const Operands& op) {
  return 2 * round_up(static_cast<size_t>(op.N) * ((op.K + op.group_size - 1) / op.group_size) * 2);
}

template <class Act, typename T, class Form>
cudaError_t run(const Operands& op, const void* x, void* out, int M, void* ws, cudaStream_t stream) {
  using G = CutlassGemm<Act, Form>;
  const int groups = (op.K + op.group_size - 1) / op.group_size;
  const size_t half = params_bytes(op) / 2;
  auto* s2 = static_cast<T*>(ws);
  auto* z2 = reinterpret_cast<T*>(static_cast<char*>(ws) + half);
  if (static_cast<int64_t>(op.N) * groups >= (int64_t{1} << 31) || groups > 65535) return cudaErrorInvalidValue;
  cutlass_params_kernel<T><<<dim3((op.N + 255) / 256, groups), 256, 0, stream>>>(
      static_cast<const T*>(op.scales), static_cast<const T*>(op.zeros), s2, z2, op.N, groups,
      static_cast<float>(1 << (op.bits - 1)));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  typename G::Gemm gemm;
  const auto args = G::arguments(op, x, out, M, s2, z2);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.initialize(args, static_cast<char*>(ws) + params_bytes(op), stream) != cutlass::Status::kSuccess)
    return cudaErrorInvalidValue;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

template <class Act, class Form>
size_t gemm_workspace(const Operands& op, int M) {
  using G = CutlassGemm<Act, Form>;
  return G::Gemm::get_workspace_size(G::arguments(op, nullptr, nullptr, M, nullptr, nullptr));
}

template <class Act>
size_t gemm_workspace(const Operands& op, int M, int form) {
  return form == 1 ? gemm_workspace<Act, Ping64>(op, M) : gemm_workspace<Act, Coop128>(op, M);
}

template <class Act, typename T>
cudaError_t run(const Operands& op, const void* x, void* out, int M, void* ws, cudaStream_t stream, int form) {
  return form == 1 ? run<Act, T, Ping64>(op, x, out, M, ws, stream) : run<Act, T, Coop128>(op, x, out, M, ws, stream);
}

}  // namespace

bool gemm_cutlass_built() { return true; }

bool gemm_cutlass_supported(const Operands& op, int M) {
  return M >= 1 && op.bits == 4 && op.N % 16 == 0 && op.K % kTileK == 0 &&
         (op.group_size % kTileK == 0 || op.group_size == op.K) && (op.alpha == 0.f || op.nnz == 0);
}

size_t gemm_cutlass_workspace(const Operands& op, int M, int form) {
  return params_bytes(op) + (op.bf16 ? gemm_workspace<cutlass::bfloat16_t>(op, M, form)
                                     : gemm_workspace<cutlass::half_t>(op, M, form));
}

cudaError_t launch_gemm_cutlass(const Operands& op, const void* x, void* out, int M, void* ws, cudaStream_t stream,
                                int form) {
  if (!gemm_cutlass_supported(op, M) || form < 0 || form >= kCutlassForms || reinterpret_cast<uintptr_t>(x) % 16 ||
      reinterpret_cast<uintptr_t>(ws) % kAlign)
    return cudaErrorInvalidValue;
  return op.bf16 ? run<cutlass::bfloat16_t, __nv_bfloat16>(op, x, out, M, ws, stream, form)
                 : run<cutlass::half_t, __half>(op, x, out, M, ws, stream, form);
}

}  // namespace libortho

#else  // built without CUTLASS: the dispatch never takes this path

namespace libortho {
bool gemm_cutlass_built() { return false; }
bool gemm_cutlass_supported(const Operands&, int) { return false; }
size_t gemm_cutlass_workspace(const Operands&, int, int) { return 0; }
cudaError_t launch_gemm_cutlass(const Operands&, const void*, void*, int, void*, cudaStream_t, int) {
  return cudaErrorNotSupported;
}
}  // namespace libortho

#endif
