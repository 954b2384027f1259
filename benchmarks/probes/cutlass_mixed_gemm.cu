// Probe (not part of the library): CUTLASS's Hopper mixed-input GEMM (INT4 weights with bf16 group scales and
// zeros, converted in registers before wgmma) at the prefill sizes of the kernel benchmark, against cuBLAS bf16 on
// the same weights dequantized, in one process. Two questions:
//  1. Is it fast enough for "M >= 512 within 1.5x bf16" on this card (the dequantize + cuBLAS path is at the edge)?
//  2. Can it read LibOrtho's packed INT4 tiles as they are? CUTLASS's reordered layout for a register-A operand
//     with four k16 atoms per thread (compute_memory_reordering_atom with MmaAtomShape (1, 4), value order
//     0,2,4,6,1,3,5,7) tiled K-innermost (Step<_2,_1,_3>) maps every (n, k) to the same nibble as libortho.quant.pack
//     (checked on the host for 32 x 256: 8192 of 8192 offsets). The "ours_*" configurations pass raw bytes with that
//     layout as uint4b_t and compare against a reference kernel that decodes the bytes by pack()'s rule; scales and
//     zeros are CUTLASS's (G, N) N-major form (LibOrtho's (N/16, G, 16) would be a derived copy), zeros additive
//     (w = s q + z', z' = -z s for LibOrtho's w = (q - z) s).
//
// Build (CUTLASS headers from the nvidia-cutlass wheel, cutlass_library/source/{include,tools/util/include}):
//   nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//        -I$C/include -I$C/tools/util/include benchmarks/probes/cutlass_mixed_gemm.cu -lcublas -o /tmp/cmg
// (-DNDEBUG: without it the device asserts are calls, and ptxas serializes the wgmmas around them, C7510.)
// Run: /tmp/cmg [M ...]   (shapes of the kernel benchmark; one JSON object per line on stdout).
// benchmarks/probes/cutlass_mixed_gemm.sh does both on the GPU machine, from the wheel carried in .deps/.
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define HAVE_CUBLAS 1
#endif
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/device_memory.h"
#include "cutlass/util/mixed_dtype_utils.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));   \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

using Act = cutlass::bfloat16_t;  // activations, scales, zeros, output
using Out = cutlass::bfloat16_t;
constexpr int kGroup = 128;
constexpr int kTileK = 64;  // 128 bytes of bf16

// The weights are CUTLASS's "A" (the narrow operand goes through registers), tokens are "B": D^T = W x^T.
using LayoutW = cutlass::layout::RowMajor;     // (N, K), K-major
using LayoutX = cutlass::layout::ColumnMajor;  // x (M, K) row-major seen as K x M column-major
using LayoutD = cutlass::layout::ColumnMajor;  // D^T (N, M) column-major == D (M, N) row-major
using StrideW = cutlass::detail::TagToStrideA_t<LayoutW>;
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;  // values 0,2,4,6,1,3,5,7 in a thread's word
// CUTLASS's own reordering (one k16 atom per thread and word, N-innermost), for the control configuration
using AtomCut = decltype(cutlass::compute_memory_reordering_atom<Act, Layout<Shape<_1, _1>>, ValueShuffle>());
using LayoutCut = decltype(cute::tile_to_shape(AtomCut{}, Layout<Shape<int, int, int>, StrideW>{}));
// LibOrtho's packed tiles: four k16 atoms per thread (16 bytes a lane per 16x64 tile), tiles K-innermost
using AtomOurs = decltype(cutlass::compute_memory_reordering_atom<Act, Layout<Shape<_1, _4>>, ValueShuffle>());
using LayoutOurs = decltype(cute::tile_to_shape(AtomOurs{}, Layout<Shape<int, int, int>, StrideW>{}, Step<_2, _1, _3>{}));

template <class Quant, class WLayout, class Tile, class Cluster, class Schedule, class EpiSchedule,
          class Scheduler = void>
struct Config {
  using Q = Quant;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, 8, Out, LayoutD, 8,
      EpiSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<Quant, Act, Act>, WLayout, 32,
      Act, LayoutX, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using C1 = Shape<_1, _1, _1>;
using CutCoop128 = Config<cutlass::int4b_t, LayoutCut, Shape<_128, _128, Int<kTileK>>, C1, Coop, CoopEpi>;
using OursCoop128 = Config<cutlass::uint4b_t, LayoutOurs, Shape<_128, _128, Int<kTileK>>, C1, Coop, CoopEpi>;
using OursPing64 = Config<cutlass::uint4b_t, LayoutOurs, Shape<_64, _128, Int<kTileK>>, C1, Ping, PingEpi>;
using OursCoop128x256 = Config<cutlass::uint4b_t, LayoutOurs, Shape<_128, _256, Int<kTileK>>, C1, Coop, CoopEpi>;
// few tokens: 64 a tile, and the same with stream-K (K split over CTAs when the tiles do not fill the SMs)
using OursCoop128x64 = Config<cutlass::uint4b_t, LayoutOurs, Shape<_128, _64, Int<kTileK>>, C1, Coop, CoopEpi>;
using OursCoop128x64StreamK = Config<cutlass::uint4b_t, LayoutOurs, Shape<_128, _64, Int<kTileK>>, C1, Coop, CoopEpi,
                                     cutlass::gemm::StreamKScheduler>;

// Reference for the "ours" layout: W (N, K) = s q + z from the raw packed words, decoded by libortho.quant.pack's
// rule (tile (n/16, k/64) of 128 words; lane (r%8)*4 + (c%8)/2 holds words 4 lane + step, step = c/16; in the word,
// nibble (c%2)*4 + r/8 + 2 ((c%16)/8)); s, z are (G, N) N-major.
__global__ void dequant_ours(const uint32_t* words, const Act* s, const Act* z, Act* w, int n, int k) {
  const int tk = k / 64;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < size_t(n) * k; i += size_t(gridDim.x) * blockDim.x) {
    const int row = int(i / k), col = int(i % k), r = row % 16, c = col % 64;
    const int lane = (r % 8) * 4 + (c % 8) / 2, step = c / 16, slot = (c % 2) * 4 + r / 8 + 2 * ((c % 16) / 8);
    const uint32_t word = words[(size_t(row / 16) * tk + col / 64) * 128 + lane * 4 + step];
    const float q = float((word >> (4 * slot)) & 15u);
    const size_t g = size_t(col / kGroup) * n + row;
    w[i] = Act(fmaf(float(s[g]), q, float(z[g])));
  }
}

__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = uint8_t(h >> 8);
  }
}

__global__ void fill_act(Act* p, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = Act(lo + (hi - lo) * float(h & 0xffffff) / float(0x1000000));
  }
}

// Relative Frobenius error of a against b (float accumulators; the outputs are bf16).
__global__ void rel_err(const Out* a, const Out* b, size_t n, double* acc) {
  double d = 0, r = 0;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const double x = float(a[i]), y = float(b[i]);
    d += (x - y) * (x - y), r += y * y;
  }
  atomicAdd(acc, d), atomicAdd(acc + 1, r);
}

struct Timer {
  cudaEvent_t a, b;
  void* flush;
  size_t flush_bytes = size_t(512) << 20;  // beyond L2 (50 MB): every timed call streams its operands from HBM
  Timer() {
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    CHECK(cudaMalloc(&flush, flush_bytes));
  }
  template <class F>
  float median_us(F&& f, int reps = 30) {
    for (int i = 0; i < 3; ++i) f();
    std::vector<float> t;
    for (int i = 0; i < reps; ++i) {
      CHECK(cudaMemsetAsync(flush, i, flush_bytes));
      CHECK(cudaEventRecord(a));
      f();
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms * 1000.f);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

template <class C, class WLayout>
float run_cutlass(const char* name, int n, int m, int k, const void* w, WLayout lw, const Act* x, const Act* s,
                  const Act* z, Out* d, Timer& timer) {
  using Gemm = typename C::Gemm;
  using StrideX = typename Gemm::GemmKernel::StrideB;
  using StrideS = typename C::Mainloop::StrideScale;
  using StrideOut = typename Gemm::GemmKernel::StrideD;
  const auto sx = cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1));
  const auto ss = cutlass::make_cute_packed_stride(StrideS{}, make_shape(n, k / kGroup, 1));
  const auto sd = cutlass::make_cute_packed_stride(StrideOut{}, make_shape(n, m, 1));
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                {n, m, k, 1},
                                {static_cast<const typename C::Q*>(w), lw, x, sx, s, ss, kGroup, z},
                                {{1.f, 0.f}, nullptr, sd, d, sd}};
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
    std::printf("{\"config\": \"%s\", \"N\": %d, \"K\": %d, \"M\": %d, \"error\": \"cannot implement\"}\n", name, n, k, m);
    return -1.f;
  }
  cutlass::device_memory::allocation<uint8_t> ws(Gemm::get_workspace_size(args));
  if (gemm.initialize(args, ws.get()) != cutlass::Status::kSuccess) std::exit(2);
  return timer.median_us([&] {
    if (gemm.run() != cutlass::Status::kSuccess) std::exit(3);
  });
}

int main(int argc, char** argv) {
  std::vector<int> ms;
  for (int i = 1; i < argc; ++i) ms.push_back(std::atoi(argv[i]));
  if (ms.empty()) ms = {64, 512, 2048};
  const int shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {14336, 4096}, {4096, 14336}, {1024, 4096}};
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
#ifdef HAVE_CUBLAS
  cublasHandle_t h;
  cublasCreate(&h);
#endif
  Timer timer;
  for (auto& sh : shapes) {
    const int n = sh[0], k = sh[1], mmax = *std::max_element(ms.begin(), ms.end());
    const size_t nk = size_t(n) * k, ng = size_t(n) * (k / kGroup);
    cutlass::device_memory::allocation<uint8_t> wq(nk / 2), wo(nk / 2);  // CUTLASS-reordered / LibOrtho-packed
    cutlass::device_memory::allocation<Act> wdq(nk), wdo(nk), s(ng), z(ng), x(size_t(mmax) * k);
    cutlass::device_memory::allocation<Out> d(size_t(mmax) * n), dref(size_t(mmax) * n);
    fill_bytes<<<1024, 256>>>(wq.get(), nk / 2, 1u);
    fill_bytes<<<1024, 256>>>(wo.get(), nk / 2, 5u);
    fill_act<<<1024, 256>>>(s.get(), ng, 2u, 0.01f, 0.02f);
    fill_act<<<1024, 256>>>(z.get(), ng, 3u, -0.16f, 0.f);  // z' = -z s, z in [0, 8]
    fill_act<<<1024, 256>>>(x.get(), size_t(mmax) * k, 4u, -1.f, 1.f);
    dequant_ours<<<1024, 256>>>(reinterpret_cast<const uint32_t*>(wo.get()), s.get(), z.get(), wdo.get(), n, k);
    CHECK(cudaGetLastError());
    // the control's W as CUTLASS's dequantize sees it before the reorder: (N, K, 1) K-major; scales (N, K / g, 1)
    auto* wq4 = reinterpret_cast<cutlass::int4b_t*>(wq.get());
    const auto lw = make_layout(make_shape(n, k, 1), cutlass::make_cute_packed_stride(StrideW{}, make_shape(n, k, 1)));
    const auto ls = make_layout(make_shape(n, k / kGroup, 1), make_stride(_1{}, int64_t(n), int64_t(n) * (k / kGroup)));
    cudaStream_t st = nullptr;
    cutlass::dequantize(wdq.get(), wq4, lw, s.get(), z.get(), ls, kGroup, st);
    const LayoutCut lcut = tile_to_shape(AtomCut{}, make_shape(n, k, 1));
    cutlass::reorder_tensor(wq4, lw, lcut);
    const LayoutOurs lours = tile_to_shape(AtomOurs{}, make_shape(n, k, 1), Step<_2, _1, _3>{});
    for (int m : ms) {
      const float one = 1.f, zero = 0.f;
      auto bf16 = [&](const Act* wd) {  // D^T (N x M, column-major) = W^T (from K x N column-major) x^T
#ifdef HAVE_CUBLAS
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, wd, CUDA_R_16BF, k, x.get(), CUDA_R_16BF, k,
                     &zero, dref.get(), CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
#else
        (void)one, (void)zero, (void)wd;  // compile check without the cuBLAS headers only
#endif
      };
      const float t_bf16 = timer.median_us([&] { bf16(wdq.get()); });
      auto report = [&](const char* name, float t, const Act* wd) {
        if (t < 0) return;
        bf16(wd);  // the reference output for this configuration's weights
        cutlass::device_memory::allocation<double> acc(2);
        CHECK(cudaMemset(acc.get(), 0, 2 * sizeof(double)));
        rel_err<<<256, 256>>>(d.get(), dref.get(), size_t(m) * n, acc.get());
        double e[2];
        CHECK(cudaMemcpy(e, acc.get(), sizeof(e), cudaMemcpyDeviceToHost));
        std::printf("{\"card\": \"%s\", \"config\": \"%s\", \"N\": %d, \"K\": %d, \"M\": %d, \"bf16_us\": %.2f, "
                    "\"mixed_us\": %.2f, \"ratio\": %.3f, \"rel_err_vs_bf16\": %.2e}\n",
                    prop.name, name, n, k, m, t_bf16, t, t / t_bf16, std::sqrt(e[0] / e[1]));
        std::fflush(stdout);
      };
      auto* xp = x.get();
      report("cutlass_layout_coop_128x128",
             run_cutlass<CutCoop128>("cutlass_layout_coop_128x128", n, m, k, wq.get(), lcut, xp, s.get(), z.get(), d.get(), timer), wdq.get());
      report("ours_coop_128x128",
             run_cutlass<OursCoop128>("ours_coop_128x128", n, m, k, wo.get(), lours, xp, s.get(), z.get(), d.get(), timer), wdo.get());
      report("ours_pingpong_64x128",
             run_cutlass<OursPing64>("ours_pingpong_64x128", n, m, k, wo.get(), lours, xp, s.get(), z.get(), d.get(), timer), wdo.get());
      report("ours_coop_128x256",
             run_cutlass<OursCoop128x256>("ours_coop_128x256", n, m, k, wo.get(), lours, xp, s.get(), z.get(), d.get(), timer), wdo.get());
      if (m <= 512) {
        report("ours_coop_128x64",
               run_cutlass<OursCoop128x64>("ours_coop_128x64", n, m, k, wo.get(), lours, xp, s.get(), z.get(), d.get(), timer), wdo.get());
        // stream-K only on request: on the H200 (2026-11-30) the probe never got past its first call of it (4096x4096,
        // M = 64; no output for over five minutes)
        if (std::getenv("PROBE_STREAMK"))
          report("ours_coop_128x64_streamk",
                 run_cutlass<OursCoop128x64StreamK>("ours_coop_128x64_streamk", n, m, k, wo.get(), lours, xp, s.get(), z.get(), d.get(), timer), wdo.get());
      }
    }
  }
#ifdef HAVE_CUBLAS
  cublasDestroy(h);
#endif
  return 0;
}
