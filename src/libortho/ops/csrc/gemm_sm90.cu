// Large-M product on Hopper in one kernel: y = x deq(Q)^T (+ bias), INT4 base only (alpha = 0 or no ortho
// entries). The packed 16x64 tiles already hold each lane's tensor-core A fragments (common.cuh), so a warp
// dequantizes its 16 weight rows in registers straight into wgmma's register A operand; a warpgroup (4 warps)
// multiplies 64 weight rows by NT tokens of x, which stream through a cp.async ring in shared memory in
// wgmma's 128-byte swizzled K-major layout. No bf16 W is ever written: the dequantize + cuBLAS path writes
// and rereads 2 bytes per weight, this one reads the half byte. Needs sm_90a (wgmma); elsewhere the launcher
// returns cudaErrorNotSupported and the caller keeps the dequantize + cuBLAS path.
#include <cuda.h>  // CUtensorMap (the TMA form); the driver function is fetched at run time

#include "common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LIBORTHO_WGMMA 1
#endif

namespace libortho {
namespace {

// A block is WG warpgroups (each 64 weight rows) by NT tokens; each trip of its K loop takes CH 64-column
// chunks (4 * CH wgmmas between two waits); x streams through a ring of STAGES chunks; MINB blocks per SM.
template <int WG_, int NT_, int CH_, int STAGES_, int MINB_>
struct GemmCfg {
  static constexpr int WG = WG_, NT = NT_, CH = CH_, STAGES = STAGES_, MINB = MINB_;
  static constexpr int kRows = 64 * WG, kThreads = 128 * WG, kTrips = STAGES / CH;  // trips held in the ring
  static constexpr int kStageBytes = NT * 128;
  static constexpr int kSmem = STAGES * kStageBytes + 1024;  // + room to align the ring to 1024 bytes
  static_assert(STAGES % CH == 0 && kTrips >= 2, "the ring holds whole trips, at least two");
};

#define LIBORTHO_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                       "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define LIBORTHO_D32 LIBORTHO_D8(0), LIBORTHO_D8(8), LIBORTHO_D8(16), LIBORTHO_D8(24)
#define LIBORTHO_D64 LIBORTHO_D32, LIBORTHO_D8(32), LIBORTHO_D8(40), LIBORTHO_D8(48), LIBORTHO_D8(56)
#define LIBORTHO_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
                        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define LIBORTHO_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
                        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
                        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "  \
                        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// d (64 x NT, fp32, this warpgroup's accumulators) += A (64 x 16, registers) * B (16 x NT, shared memory).
// A0..A3: the operand numbers of a's registers, DESC the descriptor's, ONE a register holding 1: scale-d is
// true, so d accumulates (it starts at 0). The trailing arguments are d's operands (LIBORTHO_D32 / D64).
#define LIBORTHO_WGMMA_RS(NT, TY, REGS, A0, A1, A2, A3, DESC, ONE, ...)                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                      \
               "wgmma.mma_async.sync.aligned.m64n" #NT "k16.f32." TY "." TY " " REGS ", "            \
               "{%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #DESC ", p, 1, 1, 0;\n}\n"               \
               : __VA_ARGS__ : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

template <typename T, int NT> struct Wgmma;
// One specialization per activation type and token count: the PTX type and the operand numbers must be literals
// in the asm string. D: accumulators per thread; A0..ONE as in LIBORTHO_WGMMA_RS.
#define LIBORTHO_WGMMA_SPEC(T, TY, NT, D, REGS, DOPS, A0, A1, A2, A3, DESC, ONE)              \
  template <> struct Wgmma<T, NT> {                                                           \
    __device__ static void run(float (&d)[D], const uint32_t (&a)[4], uint64_t desc) {        \
      LIBORTHO_WGMMA_RS(NT, TY, REGS, A0, A1, A2, A3, DESC, ONE, DOPS);                       \
    }                                                                                         \
  };
LIBORTHO_WGMMA_SPEC(__nv_bfloat16, "bf16", 64, 32, LIBORTHO_REGS32, LIBORTHO_D32, 32, 33, 34, 35, 36, 37)
LIBORTHO_WGMMA_SPEC(__half, "f16", 64, 32, LIBORTHO_REGS32, LIBORTHO_D32, 32, 33, 34, 35, 36, 37)
LIBORTHO_WGMMA_SPEC(__nv_bfloat16, "bf16", 128, 64, LIBORTHO_REGS64, LIBORTHO_D64, 64, 65, 66, 67, 68, 69)
LIBORTHO_WGMMA_SPEC(__half, "f16", 128, 64, LIBORTHO_REGS64, LIBORTHO_D64, 64, 65, 66, 67, 68, 69)

__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ inline void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async wrote the ring through the generic proxy; wgmma reads it through the async proxy.
__device__ inline void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Shared-memory matrix descriptor of an (NT x 64) K-major tile, 128-byte swizzle: rows of 128 bytes, 8-row
// atoms of 1024 bytes (the stride byte offset); the leading byte offset is unused for this layout.
__device__ inline uint64_t swizzled_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Stage `stage` of the ring <- x rows m0..m0+NT-1, columns kt*64..+63 (rows past M, or a chunk past K: zero).
// Row r's 16-byte chunk c goes to chunk c ^ (r % 8) of its 128-byte row: the swizzle the descriptor declares.
template <class C, typename T>
__device__ inline void load_x_stage(uint8_t* ring, int stage, const T* __restrict__ x, int m0, int M, int K, int kt) {
  uint8_t* base = ring + stage * C::kStageBytes;
  const bool in_k = kt * 64 < K;
#pragma unroll
  for (int j = 0; j < C::NT * 8 / C::kThreads; ++j) {
    const int i = j * C::kThreads + threadIdx.x, r = i >> 3, c = i & 7, m = m0 + r;
    const bool ok = m < M && in_k;
    const T* src = x + (ok ? static_cast<size_t>(m) * K + kt * 64 + c * 8 : 0);
    cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, ok);
  }
}

// One lane's operands of one chunk: the tile's words and its rows' scale / zero bit patterns.
struct GemmChunk {
  uint32_t w[4], s_lo, s_hi, z_lo, z_hi;
};

// A chunk past K (an odd chunk count's last trip) reads the last chunk again: x is zero there.
__device__ inline void load_gemm_chunk(GemmChunk& c, const int32_t* qstrip, const uint16_t* sstrip,
                                       const uint16_t* zstrip, const GroupIndex& gi, int kt, int Tk, int lane) {
  kt = min(kt, Tk - 1);
  load_words<4>(c.w, qstrip + static_cast<size_t>(kt) * 128 + lane * 4);
  const int o = gi.of(kt * 64) * 16 + (lane >> 2);
  c.s_lo = __ldg(sstrip + o);
  c.s_hi = __ldg(sstrip + o + 8);
  if (zstrip) {
    c.z_lo = __ldg(zstrip + o);
    c.z_hi = __ldg(zstrip + o + 8);
  }
}

// A warp's accumulators (rows r16..r16+15, tokens m0..m0+NT-1) to y (+ bias), or without bias to its split-K
// slice `part` (fp32, (M, N)). Layout (per warp, as mma.m16n8's C per 8 tokens): acc[4j + {0,1}] = row g,
// tokens 8j + 2t + {0,1}; acc[4j + {2,3}] = row g + 8, the same tokens.
template <int NT, typename T>
__device__ inline void store_acc(const float (&acc)[NT / 2], T* __restrict__ y, float* __restrict__ part,
                                 const T* __restrict__ bias, int r16, int m0, int M, int N, int lane) {
  const int g = lane >> 2, tg = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = r16 + g + 8 * h;
    if (row >= N) continue;
    const float b = bias && !part ? Num<T>::f(bias[row]) : 0.f;
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + 8 * j + 2 * tg + e;
        if (m >= M) continue;
        const size_t i = static_cast<size_t>(m) * N + row;
        if (part) part[i] = acc[4 * j + 2 * h + e];
        else y[i] = Num<T>::from(acc[4 * j + 2 * h + e] + b);
      }
  }
}

// y = sum of the split-K slices in slice order (deterministic) + bias.
template <typename T>
__global__ void gemm_finish_kernel(const float* __restrict__ parts, int splits, const T* __restrict__ bias,
                                   T* __restrict__ y, int M, int N) {
  const size_t total = static_cast<size_t>(M) * N;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < splits; ++z) v += parts[z * total + i];
    y[i] = Num<T>::from(v + (bias ? Num<T>::f(bias[i % N]) : 0.f));
  }
}

struct GemmStrip {
  const int32_t* q;
  const uint16_t* s;
  const uint16_t* z;
  GroupIndex gi;
  int Tk;
};

// The packed words, scales and zeros of 16-row strip `strip` (Tk 64-column chunks per row).
__device__ inline GemmStrip gemm_strip(const Operands& op, int strip, int Tk) {
  const int groups = (op.K + op.group_size - 1) / op.group_size;
  const size_t sz = static_cast<size_t>(strip) * groups * 16;
  return {op.qweight + static_cast<size_t>(strip) * Tk * 128, static_cast<const uint16_t*>(op.scales) + sz,
          op.zeros ? static_cast<const uint16_t*>(op.zeros) + sz : nullptr, GroupIndex(op.group_size, op.K), Tk};
}

// Trip t of the K loop: chunks t*CH .. t*CH+CH-1. Ring protocol: trip t's chunks sit in ring slot t % kTrips;
// after the barrier every warpgroup has waited for trip t-1's wgmmas, so that slot takes trip t-1+kTrips.
// A trip's products are waited for before the next trip's dequantization: ptxas serializes register-A wgmmas
// whose next A fragments are written while they run, so the overlap comes from the other blocks on the SM.
// c holds this trip's chunk operands on entry and trip t+2's on exit (the caller alternates two sets).
template <class C, typename T>
__device__ inline void gemm_trip(float (&acc)[C::NT / 2], GemmChunk (&c)[C::CH], int t, int trips, int kbase,
                                 uint8_t* ring, uint32_t ring_s, const T* __restrict__ x, int m0, int M, int K,
                                 const GemmStrip& st, int lane) {
  uint32_t a[C::CH * 4][4];
#pragma unroll
  for (int h = 0; h < C::CH; ++h) {
    const RowParams<T> p = row_params4<T, true>(c[h].s_lo, c[h].s_hi, c[h].z_lo, c[h].z_hi, st.z != nullptr);
#pragma unroll
    for (int step = 0; step < 4; ++step) dequant_step<T, 4>(a[h * 4 + step], c[h].w, step, p);
  }
  if (t + 2 < trips)
#pragma unroll
    for (int h = 0; h < C::CH; ++h)
      load_gemm_chunk(c[h], st.q, st.s, st.z, st.gi, kbase + (t + 2) * C::CH + h, st.Tk, lane);
  cp_wait<C::kTrips - 2>();
  fence_proxy_async();
  __syncthreads();
  const int refill = t - 1 + C::kTrips;
  if (refill < trips)
#pragma unroll
    for (int h = 0; h < C::CH; ++h)
      load_x_stage<C>(ring, (refill % C::kTrips) * C::CH + h, x, m0, M, K, kbase + refill * C::CH + h);
  cp_commit();
  uint64_t desc[C::CH * 4];  // one per k16 step (+32 bytes each), all made before the fence: between the fence
                             // and the commit only wgmmas may define their inputs, or ptxas serializes them
#pragma unroll
  for (int h = 0; h < C::CH; ++h)
#pragma unroll
    for (int step = 0; step < 4; ++step)
      desc[h * 4 + step] = swizzled_desc(ring_s + ((t % C::kTrips) * C::CH + h) * C::kStageBytes + step * 32);
  wgmma_fence();
#pragma unroll
  for (int i = 0; i < C::CH * 4; ++i) Wgmma<T, C::NT>::run(acc, a[i], desc[i]);
  wgmma_commit();
  wgmma_wait<0>();
}

template <class C, typename T>
__global__ void __launch_bounds__(C::kThreads, C::MINB) gemm_int4_kernel(Operands op, const T* __restrict__ x,
                                                                        const T* __restrict__ bias,
                                                                        T* __restrict__ y, int M, int per_split) {
#ifdef LIBORTHO_WGMMA
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - (raw_s & 1023u)) & 1023u;  // swizzle atoms must sit on 1024-byte boundaries
  uint8_t* ring = smem_raw + pad;
  const uint32_t ring_s = raw_s + pad;
  // Split-K: slice blockIdx.z takes chunks [kbase, kbase + per_split) (per_split a multiple of CH, so a trip
  // never reaches into the next slice; chunks past K read zero x).
  const int K = op.K, N = op.N, Tk = K / 64, tn = (N + 15) / 16, kbase = blockIdx.z * per_split;
  const int trips = (min(Tk, kbase + per_split) - kbase + C::CH - 1) / C::CH;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * C::kRows, m0 = blockIdx.y * C::NT;
  // Warp w of the block is warp w % 4 of warpgroup w / 4: rows 16w..16w+15 of the block's. Strips past the
  // layer's last read its last strip (valid memory); their rows are never stored.
  const GemmStrip st = gemm_strip(op, min(row0 / 16 + warp, tn - 1), Tk);

#pragma unroll
  for (int t = 0; t < C::kTrips - 1; ++t) {
    if (t < trips)
#pragma unroll
      for (int h = 0; h < C::CH; ++h) load_x_stage<C>(ring, t * C::CH + h, x, m0, M, K, kbase + t * C::CH + h);
    cp_commit();
  }
  float acc[C::NT / 2];
#pragma unroll
  for (int i = 0; i < C::NT / 2; ++i) acc[i] = 0.f;
  GemmChunk c0[C::CH], c1[C::CH];
#pragma unroll
  for (int h = 0; h < C::CH; ++h) {
    load_gemm_chunk(c0[h], st.q, st.s, st.z, st.gi, kbase + h, Tk, lane);
    load_gemm_chunk(c1[h], st.q, st.s, st.z, st.gi, kbase + C::CH + h, Tk, lane);
  }
  for (int t = 0; t < trips; t += 2) {  // two trips per pass: the operand sets alternate at compile time
    gemm_trip<C, T>(acc, c0, t, trips, kbase, ring, ring_s, x, m0, M, K, st, lane);
    if (t + 1 < trips) gemm_trip<C, T>(acc, c1, t + 1, trips, kbase, ring, ring_s, x, m0, M, K, st, lane);
  }

  float* part = op.gemm_ws ? op.gemm_ws + static_cast<size_t>(blockIdx.z) * M * N : nullptr;
  store_acc<C::NT>(acc, y, part, bias, row0 + warp * 16, m0, M, N, lane);
#endif
}

// ---- Warp-specialized form: warp 8 of the block fills the x ring, the two consumer warpgroups (warps 0-7)
// run their K loops independently, so one can dequantize while the other multiplies (within a warpgroup the
// two cannot overlap, see gemm_trip). full[s]: the producer's 32 lanes arrive once their copies into stage s
// landed (each fences its own writes for the async proxy first, as the lock-step form does); empty[s]: the 8
// consumer warps arrive once their wgmmas reading stage s completed.
__device__ inline void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ inline void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Box (64 columns x NT rows) of x at column k0, row m0 into shared memory at dst; completes `bytes` on bar.
__device__ inline void tma_load_x(uint32_t dst, const CUtensorMap* map, int k0, int m0, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
               ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(m0), "r"(bar) : "memory");
}
__device__ inline void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}

// TMA: the producer loads a stage with one cp.async.bulk.tensor (the 128-byte swizzle done by the copy engine,
// rows past M zero-filled, the stage's bytes counted on full[s]) instead of its 32 lanes' cp.asyncs.
template <int NT_, int STAGES_, int DEPTH_, int MINB_, bool TMA_ = false>
struct GemmWsCfg {
  static constexpr int NT = NT_, STAGES = STAGES_, DEPTH = DEPTH_, MINB = MINB_;  // DEPTH: chunks the producer
  static constexpr bool TMA = TMA_;                                               // keeps in flight (cp.async)
  static constexpr int kRows = 128, kThreads = 288, kStageBytes = NT * 128;
  static constexpr int kSmem = STAGES * kStageBytes + 1024 + 2 * STAGES * 8;
  static_assert(DEPTH >= 1 && DEPTH < STAGES, "the producer waits for a stage only after releasing older ones");
};

template <class C, typename T>
__global__ void __launch_bounds__(C::kThreads, C::MINB) gemm_ws_kernel(Operands op, const T* __restrict__ x,
                                                                      const T* __restrict__ bias,
                                                                      T* __restrict__ y, int M,
                                                                      const __grid_constant__ CUtensorMap xmap) {
#ifdef LIBORTHO_WGMMA
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - (raw_s & 1023u)) & 1023u;
  uint8_t* ring = smem_raw + pad;
  const uint32_t ring_s = raw_s + pad;
  const uint32_t full_s = ring_s + C::STAGES * C::kStageBytes, empty_s = full_s + C::STAGES * 8;
  const int K = op.K, N = op.N, Tk = K / 64, tn = (N + 15) / 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * C::kRows, m0 = blockIdx.y * C::NT;
  if (threadIdx.x == 0)
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(full_s + 8 * s, C::TMA ? 1 : 32);
      mbar_init(empty_s + 8 * s, 8);
    }
  __syncthreads();  // the last block-wide barrier: the producer warp leaves its loop early

  if (warp == 8 && C::TMA) {  // producer, one thread
    if (lane == 0)
      for (int kt = 0; kt < Tk; ++kt) {
        const int s = kt % C::STAGES;
        if (kt >= C::STAGES) mbar_wait(empty_s + 8 * s, ((kt / C::STAGES) & 1) ^ 1);
        mbar_arrive_expect_tx(full_s + 8 * s, C::kStageBytes);
        tma_load_x(ring_s + s * C::kStageBytes, &xmap, kt * 64, m0, full_s + 8 * s);
      }
    return;
  }
  if (warp == 8) {  // producer, 32 lanes of cp.async
    for (int kt = 0; kt < Tk + C::DEPTH; ++kt) {
      if (kt < Tk) {
        const int s = kt % C::STAGES;
        if (kt >= C::STAGES) mbar_wait(empty_s + 8 * s, ((kt / C::STAGES) & 1) ^ 1);
        uint8_t* base = ring + s * C::kStageBytes;
#pragma unroll 4
        for (int j = 0; j < C::NT * 8 / 32; ++j) {
          const int i = j * 32 + lane, r = i >> 3, c = i & 7, m = m0 + r;
          const T* src = x + (m < M ? static_cast<size_t>(m) * K + kt * 64 + c * 8 : 0);
          cp_async16(base + r * 128 + ((c ^ (r & 7)) << 4), src, m < M);
        }
      }
      cp_commit();
      const int done = kt - C::DEPTH;  // this lane's copies of chunk `done` have landed once DEPTH newer groups wait
      if (done >= 0) {
        cp_wait<C::DEPTH>();
        fence_proxy_async();
        mbar_arrive(full_s + 8 * (done % C::STAGES));
      }
    }
    return;
  }

  const GemmStrip st = gemm_strip(op, min(row0 / 16 + warp, tn - 1), Tk);
  float acc[C::NT / 2];
#pragma unroll
  for (int i = 0; i < C::NT / 2; ++i) acc[i] = 0.f;
  GemmChunk cc[2];
  load_gemm_chunk(cc[0], st.q, st.s, st.z, st.gi, 0, Tk, lane);
  load_gemm_chunk(cc[1], st.q, st.s, st.z, st.gi, 1, Tk, lane);
  auto chunk = [&](GemmChunk& c, int kt) {
    uint32_t a[4][4];
    const RowParams<T> p = row_params4<T, true>(c.s_lo, c.s_hi, c.z_lo, c.z_hi, st.z != nullptr);
#pragma unroll
    for (int step = 0; step < 4; ++step) dequant_step<T, 4>(a[step], c.w, step, p);
    if (kt + 2 < Tk) load_gemm_chunk(c, st.q, st.s, st.z, st.gi, kt + 2, Tk, lane);
    const int s = kt % C::STAGES;
    uint64_t desc[4];
#pragma unroll
    for (int step = 0; step < 4; ++step) desc[step] = swizzled_desc(ring_s + s * C::kStageBytes + step * 32);
    mbar_wait(full_s + 8 * s, (kt / C::STAGES) & 1);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < 4; ++step) Wgmma<T, C::NT>::run(acc, a[step], desc[step]);
    wgmma_commit();
    wgmma_wait<0>();
    if (lane == 0) mbar_arrive(empty_s + 8 * s);
  };
  for (int kt = 0; kt < Tk; kt += 2) {
    chunk(cc[0], kt);
    if (kt + 1 < Tk) chunk(cc[1], kt + 1);
  }

  store_acc<C::NT>(acc, y, static_cast<float*>(nullptr), bias, row0 + warp * 16, m0, M, N, lane);
#endif
}

// x (M, K) as a TMA tensor map: boxes of 64 columns (128 bytes, the swizzle span) by NT rows, 128-byte swizzle,
// rows past M read as zeros. cuTensorMapEncodeTiled is a driver function: fetched once through the runtime.
bool x_tensor_map(CUtensorMap* map, const void* x, int M, int K, int NT, bool bf16) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                              const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const bool ok = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) ==
                        cudaSuccess && q == cudaDriverEntryPointSuccess;
    return ok ? reinterpret_cast<Encode>(fn) : nullptr;
  }();
  if (!encode) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};  // bytes, of every dimension but the first
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(NT)}, unit[2] = {1, 1};
  return encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<void*>(x),
                dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <class C, typename T>
cudaError_t gemm_ws_launch(const Operands& op, const void* x, const void* bias, void* y, int M, cudaStream_t s) {
  CUtensorMap xmap{};
  if (C::TMA && !x_tensor_map(&xmap, x, M, op.K, C::NT, op.bf16)) return cudaErrorNotSupported;
  static bool configured = false;
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(gemm_ws_kernel<C, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               C::kSmem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const dim3 grid((op.N + C::kRows - 1) / C::kRows, (M + C::NT - 1) / C::NT);
  gemm_ws_kernel<C, T><<<grid, C::kThreads, C::kSmem, s>>>(op, static_cast<const T*>(x),
                                                           static_cast<const T*>(bias), static_cast<T*>(y), M, xmap);
  return cudaGetLastError();
}

// Split-K for grids under half a wave (small M on short layers): slices of whole trips, at least two trips
// each, enough of them to fill the SMs once.
struct Split {
  int count, chunks;  // slices, chunks per slice (a multiple of CH; the last slice may hold fewer)
};

template <class C>
Split gemm_splits(const Operands& op, int M) {
  const int blocks = ((op.N + C::kRows - 1) / C::kRows) * ((M + C::NT - 1) / C::NT);
  const int slots = device_info().sms * C::MINB, trips = (op.K / 64 + C::CH - 1) / C::CH;
  if (2 * blocks > slots || trips < 4) return {1, trips * C::CH};
  const int want = std::min((slots + blocks - 1) / blocks, trips / 2);
  const int per = (trips + want - 1) / want;  // trips per slice
  return {(trips + per - 1) / per, per * C::CH};
}

template <class C, typename T>
cudaError_t gemm_launch(const Operands& op, const void* x, const void* bias, void* y, int M, cudaStream_t s) {
  static bool configured = false;  // per instance; the attribute belongs to the function, on every device
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(gemm_int4_kernel<C, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               C::kSmem);
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const Split sp = gemm_splits<C>(op, M);
  const int splits = sp.count, per_split = sp.chunks;
  if (splits > 1 && !op.gemm_ws) return cudaErrorInvalidValue;
  const dim3 grid((op.N + C::kRows - 1) / C::kRows, (M + C::NT - 1) / C::NT, splits);
  Operands o = op;
  if (splits == 1) o.gemm_ws = nullptr;
  gemm_int4_kernel<C, T><<<grid, C::kThreads, C::kSmem, s>>>(o, static_cast<const T*>(x), static_cast<const T*>(bias),
                                                             static_cast<T*>(y), M, per_split);
  if (splits > 1) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t total = static_cast<int64_t>(M) * op.N;
    const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 8 * device_info().sms));
    gemm_finish_kernel<T><<<blocks, 256, 0, s>>>(op.gemm_ws, splits, static_cast<const T*>(bias), static_cast<T*>(y),
                                                 M, op.N);
  }
  return cudaGetLastError();
}

// Configurations (LIBORTHO_GEMM_CFG picks one for a probe; 0 is the default): 0-3 lock-step, 4-7 warp-specialized.
using GemmCfg0 = GemmCfg<1, 128, 2, 6, 2>;  // 64 rows x 128 tokens, 128 columns per trip, 96 KB ring, 2 per SM
using GemmCfg1 = GemmCfg<1, 128, 2, 4, 3>;  // the same with a 64 KB ring, 3 per SM
using GemmCfg2 = GemmCfg<2, 128, 1, 4, 2>;  // 128 rows x 128 tokens, 64 columns per trip (the first form)
using GemmCfg3 = GemmCfg<1, 64, 2, 6, 3>;   // 64 rows x 64 tokens, 48 KB ring
using GemmCfg4 = GemmWsCfg<128, 6, 3, 1>;    // warp-specialized, 128 rows x 128 tokens, 96 KB ring
using GemmCfg5 = GemmWsCfg<64, 6, 3, 2>;     // warp-specialized, 128 rows x 64 tokens, 2 per SM
using GemmCfg6 = GemmWsCfg<128, 6, 1, 1, true>;  // configuration 4 with a TMA producer
using GemmCfg7 = GemmWsCfg<64, 6, 1, 2, true>;   // configuration 5 with a TMA producer

template <typename T>
cudaError_t gemm_dispatch(const Operands& op, const void* x, const void* bias, void* y, int M, int cfg, cudaStream_t s) {
  switch (cfg) {
    case 0: return gemm_launch<GemmCfg0, T>(op, x, bias, y, M, s);
    case 1: return gemm_launch<GemmCfg1, T>(op, x, bias, y, M, s);
    case 2: return gemm_launch<GemmCfg2, T>(op, x, bias, y, M, s);
    case 3: return gemm_launch<GemmCfg3, T>(op, x, bias, y, M, s);
    case 4: return gemm_ws_launch<GemmCfg4, T>(op, x, bias, y, M, s);
    case 5: return gemm_ws_launch<GemmCfg5, T>(op, x, bias, y, M, s);
    case 6: return gemm_ws_launch<GemmCfg6, T>(op, x, bias, y, M, s);
    case 7: return gemm_ws_launch<GemmCfg7, T>(op, x, bias, y, M, s);
    default: return cudaErrorInvalidValue;
  }
}

int g_gemm_cfg = -1;

// The configuration a call runs (H200, 2026-11-30, Llama shapes): up to 64 tokens the lock-step 64 x 64 form,
// split along K when its grid is under half a wave (0.88-1.45x bf16 time at M 32-64 against 1.4-2.5x for
// dequantize + cuBLAS), else the TMA form with 64-token blocks (1.05-1.08x on 14336x4096, where the former
// does not split); above, the TMA form with 128-token blocks (the best GEMM at M 512-2048, still slower than
// dequantize + cuBLAS there, so cuda.py's default sends those calls to the latter). At K <= 4096 the split pays
// only while its 64-row blocks fill under 5/12 of the slots: from there the TMA form's single pass is faster
// (11008x4096 at M 33-64: 0.94-0.98x the split's time; 10240x4096 even; 9216x4096 1.03-1.07x; at K = 14336 the
// split stays 0.91-0.94x: results/gemm-split-H200.json).
int gemm_pick(const Operands& op, int M) {
  if (g_gemm_cfg >= 0) return g_gemm_cfg;
  if (M > 64) return 6;
  const int blocks = (op.N + GemmCfg3::kRows - 1) / GemmCfg3::kRows, slots = device_info().sms * GemmCfg3::MINB;
  if (op.K <= 4096 && 12 * blocks > 5 * slots) return 7;
  return gemm_splits<GemmCfg3>(op, M).count > 1 ? 3 : 7;
}

}  // namespace

bool set_gemm_cfg(int cfg) {
  if (cfg < -1 || cfg >= kGemmCfgs) return false;
  g_gemm_cfg = cfg;
  return true;
}
int gemm_cfg() { return g_gemm_cfg; }

int gemm_int4_splits(const Operands& op, int M) {
  switch (gemm_pick(op, M)) {  // the warp-specialized forms (4-7) do not split
    case 0: return gemm_splits<GemmCfg0>(op, M).count;
    case 1: return gemm_splits<GemmCfg1>(op, M).count;
    case 2: return gemm_splits<GemmCfg2>(op, M).count;
    case 3: return gemm_splits<GemmCfg3>(op, M).count;
    default: return 1;
  }
}

bool gemm_int4_supported(const Operands& op, int M) {
  const bool groups_whole = op.group_size % 64 == 0 || op.group_size >= op.K;
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  return op.bits == 4 && op.K % 64 == 0 && op.K > 0 && op.N > 0 && M > 0 && groups_whole &&
         (!ortho || M <= kGemmOrthoMaxM) && device_info().cc90;
}

cudaError_t launch_gemm_int4(const Operands& op, const void* x, const void* bias, void* y, int M, cudaStream_t stream) {
  if (!gemm_int4_supported(op, M) || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  if (ortho && (!op.xt || op.xt_ld < M)) return cudaErrorInvalidValue;
  if (!device_info().sm90a) return cudaErrorNotSupported;  // the kernel has a body only when built for sm_90a
  Operands base = op;
  base.alpha = 0.f;  // the GEMM takes the base; the ortho stream is added after it
  const int cfg = gemm_pick(op, M);
  const cudaError_t e = op.bf16 ? gemm_dispatch<__nv_bfloat16>(base, x, bias, y, M, cfg, stream)
                                : gemm_dispatch<__half>(base, x, bias, y, M, cfg, stream);
  if (e != cudaSuccess || !ortho) return e;
  return launch_ortho_add(op, y, M, stream);
}

}  // namespace libortho
