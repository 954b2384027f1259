// LibOrtho CUDA kernels: the fused dual-stream GEMM for small M (decode) and the dequantize-and-merge
// kernel for large M (prefill). Layout of the packed base: see libortho/quant.py. In short, a warp reads
// one 16x64 tile as 32*BITS consecutive words; lane l's words hold exactly the A-operand fragments of
// four mma.m16n8k16 steps, so the weights go from one wide load to tensor-core registers with no
// shared-memory round trip. The activations are the B operand (the "swap AB" trick for small M).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace libortho {
namespace {

constexpr int kWarps = 8;       // warps per block, each sweeping its share of the K tiles

template <typename T> struct Num;
template <> struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 in both halves: 0x4300 | q == 128 + q
  static constexpr float kMagicF = 128.f;
  __device__ static float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static T2 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ static T2 pair2(__nv_bfloat16 v) { return __halves2bfloat162(v, v); }
};
template <> struct Num<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0: 0x6400 | q == 1024 + q
  static constexpr float kMagicF = 1024.f;
  __device__ static float f(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
  __device__ static T2 pair(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ static T2 pair2(__half v) { return __halves2half2(v, v); }
};

template <typename T2> __device__ inline uint32_t as_u32(T2 v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename T2> __device__ inline T2 as_t2(uint32_t v) { return *reinterpret_cast<T2*>(&v); }

template <typename T>
__device__ inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (sizeof(T) == 2 && Num<T>::kMagic == 0x43004300u) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// The BITS words of one lane of one tile.
template <int BITS>
__device__ inline void load_words(uint32_t (&w)[BITS], const int32_t* p) {
  if constexpr (BITS == 4) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (BITS == 8) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; w[4] = u.x; w[5] = u.y; w[6] = u.z; w[7] = u.w;
  } else if constexpr (BITS == 2) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = static_cast<uint32_t>(__ldg(p + i));
  }
}

// Code v (0..31) of a lane's bit stream; v is a compile-time constant after unrolling.
template <int BITS>
__device__ inline uint32_t code_at(const uint32_t (&w)[BITS], int v) {
  const int pos = BITS * v, idx = pos >> 5, off = pos & 31;
  uint32_t c = w[idx] >> off;
  if (off + BITS > 32) c |= w[idx + 1] << (32 - off);
  return c & ((1u << BITS) - 1u);
}

// Scale and (magic + zero) of rows g and g+8 for one group, in the forms the dequantizer wants.
template <typename T>
struct RowParams {
  typename Num<T>::T2 s_lo, s_hi, zm_lo, zm_hi;  // pairs (x, x): INT4 magic-number path
  float fs_lo, fs_hi, fz_lo, fz_hi;               // floats: generic path
};

template <typename T, int BITS>
__device__ inline RowParams<T> row_params(T s_lo, T s_hi, float z_lo, float z_hi) {
  RowParams<T> p;
  if constexpr (BITS == 4) {
    p.s_lo = Num<T>::pair2(s_lo);
    p.s_hi = Num<T>::pair2(s_hi);
    p.zm_lo = Num<T>::pair(Num<T>::kMagicF + z_lo, Num<T>::kMagicF + z_lo);
    p.zm_hi = Num<T>::pair(Num<T>::kMagicF + z_hi, Num<T>::kMagicF + z_hi);
  } else {
    p.fs_lo = Num<T>::f(s_lo);
    p.fs_hi = Num<T>::f(s_hi);
    p.fz_lo = z_lo;
    p.fz_hi = z_hi;
  }
  return p;
}

// A fragment (4 registers of 2 values) of k16 step `step` from the lane's words.
// Register i holds fragment elements (2i, 2i+1): row g + 8*(i%2), columns 2*tig + 8*(i/2) + {0,1};
// they sit at slots i and i+4 of the step.
template <typename T, int BITS>
__device__ inline void dequant_step(uint32_t (&a)[4], const uint32_t (&w)[BITS], int step, const RowParams<T>& p) {
  using T2 = typename Num<T>::T2;
  if constexpr (BITS == 4) {
    const uint32_t word = w[step];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // (magic + q) - (magic + z) is exact; one rounding in the product, as (q - z) * s would have.
      T2 v = as_t2<T2>(((word >> (4 * i)) & 0x000F000Fu) | Num<T>::kMagic);
      v = __hmul2(__hsub2(v, (i & 1) ? p.zm_hi : p.zm_lo), (i & 1) ? p.s_hi : p.s_lo);
      a[i] = as_u32(v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = (i & 1) ? p.fs_hi : p.fs_lo, z = (i & 1) ? p.fz_hi : p.fz_lo;
      const float v0 = (static_cast<float>(code_at<BITS>(w, 8 * step + i)) - z) * s;
      const float v1 = (static_cast<float>(code_at<BITS>(w, 8 * step + 4 + i)) - z) * s;
      a[i] = as_u32(Num<T>::pair(v0, v1));
    }
  }
}

// Scales (or zeros) of the two 32-column halves of a tile for rows g and g+8: steps {0,1} share a
// group, and so do steps {2,3}, because every supported group size is a multiple of 32 or the whole row.
template <typename T>
__device__ inline void load_tile_params(T (&p)[2][2], const T* base, int kt, int K, int group_size, int g) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int grp = min(kt * 64 + 32 * h, K - 1) / group_size;
    p[h][0] = base[grp * 16 + g];
    p[h][1] = base[grp * 16 + g + 8];
  }
}

// Everything one warp needs for kU consecutive K tiles of its sweep (weights, scales, zeros and, for
// small M, the activation fragments), loaded together so a chunk costs one memory latency.
template <typename T, int BITS, int NT, int kU, bool kPrefetchX>
struct Chunk {
  uint32_t w[kU][BITS];
  T s[kU][2][2], z[kU][2][2];
  uint32_t xb[kPrefetchX ? kU : 1][4][kPrefetchX ? NT : 1][2];
};

// B fragment of one k16 step from a row of x seen as 32-bit pairs (nullptr: a padding row, zeros).
// K is even, so a pair lies entirely inside or outside the row; `full` skips the check on full tiles.
__device__ inline void x_fragment(uint32_t& b0, uint32_t& b1, const uint32_t* xr, int kk, int tig, int K, bool full) {
  if (xr == nullptr) {
    b0 = b1 = 0u;
  } else if (full) {
    b0 = __ldg(xr + (kk >> 1) + tig);
    b1 = __ldg(xr + (kk >> 1) + 4 + tig);
  } else {
    b0 = kk + 2 * tig < K ? __ldg(xr + (kk >> 1) + tig) : 0u;
    b1 = kk + 8 + 2 * tig < K ? __ldg(xr + (kk >> 1) + 4 + tig) : 0u;
  }
}

template <typename T, int BITS, int NT, int kU, bool kPrefetchX>
__device__ inline void load_chunk(Chunk<T, BITS, NT, kU, kPrefetchX>& c, int kt0, int Tk, const int32_t* qtile,
                                  const T* sc, const T* zp, const uint32_t* const (&xrow)[NT], int K,
                                  int group_size, int g, int tig) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int kt = kt0 + u * kWarps;
    if (kt >= Tk) break;
    load_words<BITS>(c.w[u], qtile + static_cast<size_t>(kt) * 32 * BITS);
    load_tile_params(c.s[u], sc, kt, K, group_size, g);
    if (zp) load_tile_params(c.z[u], zp, kt, K, group_size, g);
    if constexpr (kPrefetchX) {
      const bool full = kt * 64 + 64 <= K;
#pragma unroll
      for (int step = 0; step < 4; ++step)
#pragma unroll
        for (int t = 0; t < NT; ++t)
          x_fragment(c.xb[u][step][t][0], c.xb[u][step][t][1], xrow[t], kt * 64 + step * 16, tig, K, full);
    }
  }
}

template <typename T, int BITS, int NT, int kU, bool kPrefetchX>
__device__ inline void compute_chunk(float (&acc)[NT][4], const Chunk<T, BITS, NT, kU, kPrefetchX>& c, int kt0,
                                     int Tk, const uint32_t* const (&xrow)[NT], int K, bool has_zeros, int tig) {
  const float zdef = static_cast<float>(1 << (BITS - 1));
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int kt = kt0 + u * kWarps;
    if (kt >= Tk) break;
    const bool full = kt * 64 + 64 <= K;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const RowParams<T> p = row_params<T, BITS>(c.s[u][h][0], c.s[u][h][1],
                                                 has_zeros ? Num<T>::f(c.z[u][h][0]) : zdef,
                                                 has_zeros ? Num<T>::f(c.z[u][h][1]) : zdef);
#pragma unroll
      for (int step = 2 * h; step < 2 * h + 2; ++step) {
        const int kk = kt * 64 + step * 16;
        if (!full && kk >= K) break;
        uint32_t a[4];
        dequant_step<T, BITS>(a, c.w[u], step, p);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          uint32_t b0, b1;
          if constexpr (kPrefetchX) {
            b0 = c.xb[u][step][t][0];
            b1 = c.xb[u][step][t][1];
          } else {
            x_fragment(b0, b1, xrow[t], kk, tig, K, full);
          }
          mma<T>(acc[t], a, b0, b1);
        }
      }
    }
  }
}

template <typename T, int BITS, int NT>
__global__ void __launch_bounds__(kWarps * 32, 2)
fused_small_m_kernel(Operands op, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                     int M) {
  constexpr int MT = NT * 8;                 // batch columns handled (padded)
  constexpr bool kPrefetchX = NT <= 2;       // activation fragments travel with the chunk
  constexpr int kU = NT == 1 ? 2 : 1;        // K tiles per chunk; two chunks in flight (double buffer)
  constexpr int kPre = 4;                    // ortho entries per thread fetched before the main loop
  __shared__ float red[kWarps][16][MT + 1];
  __shared__ float orth[16][MT + 1];
  __shared__ int rp[17];

  const int tn = blockIdx.x, n0 = tn * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (op.K + op.group_size - 1) / op.group_size;
  const int Tk = (K + 63) >> 6;
  const int32_t* qtile = op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = static_cast<const T*>(op.zeros);
  if (zp) zp += static_cast<size_t>(tn) * G * 16;

  // The ortho stream (skipped entirely when alpha == 0, the kill switch). The tile's entries are
  // flattened and cut into equal contiguous runs, one per thread, whatever the row lengths (a dense
  // row costs its tile no more than the same count spread over rows). The first kPre entries of each
  // run are fetched right after the first weight chunk, so their latency hides behind the base stream.
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  int run_b = 0, run_e = 0, e_lo = 0, e_hi = 0;
  int pc[kPre];
  float pv[kPre];
  if (ortho) {
    e_lo = op.row_ptr[n0];
    e_hi = op.row_ptr[min(n0 + 16, N)];
    if (threadIdx.x <= 16) rp[threadIdx.x] = op.row_ptr[min(n0 + static_cast<int>(threadIdx.x), N)];
    for (int i = threadIdx.x; i < 16 * (MT + 1); i += blockDim.x) (&orth[0][0])[i] = 0.f;
  }

  float acc[NT][4];
  const uint32_t* xrow[NT];  // this lane's rows of x (batch rows t*8 + g) as 32-bit pairs
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const int m = t * 8 + g;
    xrow[t] = m < M ? reinterpret_cast<const uint32_t*>(x + static_cast<size_t>(m) * K) : nullptr;
  }

  // Each warp sweeps K tiles warp, warp + kWarps, ... in chunks of kU tiles, loading the next chunk
  // while it computes the current one (two register buffers, used in turn).
  constexpr int stride = kWarps * kU;
  Chunk<T, BITS, NT, kU, kPrefetchX> ca, cb;
  const bool hz = zp != nullptr;
  if (warp < Tk) load_chunk(ca, warp, Tk, qtile, sc, zp, xrow, K, op.group_size, g, tig);
  if (ortho) {
    const int per = (e_hi - e_lo + blockDim.x - 1) / blockDim.x;
    run_b = e_lo + threadIdx.x * per;
    run_e = min(run_b + per, e_hi);
#pragma unroll
    for (int i = 0; i < kPre; ++i) {
      const int e = run_b + i;
      pc[i] = e < run_e ? (op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e])
                                    : static_cast<const int32_t*>(op.col_idx)[e]) : 0;
      pv[i] = e < run_e ? Num<T>::f(static_cast<const T*>(op.values)[e]) : 0.f;
    }
  }
  for (int kt0 = warp; kt0 < Tk; kt0 += 2 * stride) {
    if (kt0 + stride < Tk) load_chunk(cb, kt0 + stride, Tk, qtile, sc, zp, xrow, K, op.group_size, g, tig);
    compute_chunk(acc, ca, kt0, Tk, xrow, K, hz, tig);
    if (kt0 + stride >= Tk) break;
    if (kt0 + 2 * stride < Tk) load_chunk(ca, kt0 + 2 * stride, Tk, qtile, sc, zp, xrow, K, op.group_size, g, tig);
    compute_chunk(acc, cb, kt0 + stride, Tk, xrow, K, hz, tig);
  }

  // C fragment: c0,c1 -> row g, batch columns 2*tig, 2*tig+1; c2,c3 -> row g+8.
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    red[warp][g][t * 8 + 2 * tig] = acc[t][0];
    red[warp][g][t * 8 + 2 * tig + 1] = acc[t][1];
    red[warp][g + 8][t * 8 + 2 * tig] = acc[t][2];
    red[warp][g + 8][t * 8 + 2 * tig + 1] = acc[t][3];
  }
  __syncthreads();
  if (ortho) {
    // Sum the run in registers, flushing to shared memory once per row it touches.
    float part[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) part[m] = 0.f;
    int row = 0;
#pragma unroll
    for (int i = 1; i < 16; ++i) row += (rp[i] <= run_b);
    for (int e = run_b; e < run_e; ++e) {
      int c;
      float v;
      const int i = e - run_b;
      if (i < kPre) {
#pragma unroll
        for (int j = 0; j < kPre; ++j)
          if (j == i) c = pc[j], v = pv[j];
      } else {
        c = op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e])
                     : static_cast<const int32_t*>(op.col_idx)[e];
        v = Num<T>::f(static_cast<const T*>(op.values)[e]);
      }
      if (e >= rp[row + 1]) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) atomicAdd(&orth[row][m], part[m]), part[m] = 0.f;
        while (e >= rp[row + 1]) ++row;
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) part[m] += v * Num<T>::f(x[static_cast<size_t>(m) * K + c]);
    }
    if (run_b < run_e)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) atomicAdd(&orth[row][m], part[m]);
    __syncthreads();
  }
  for (int i = threadIdx.x; i < 16 * M; i += blockDim.x) {
    const int r = i & 15, m = i >> 4, n = n0 + r;
    if (n >= N) continue;
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) y += red[w][r][m];
    if (ortho) y += op.alpha * orth[r][m];
    if (bias) y += Num<T>::f(bias[n]);
    out[static_cast<size_t>(m) * N + n] = Num<T>::from(y);
  }
}

// One warp per 16x64 tile: decode to shared memory, then write 16 rows of 64 values coalesced.
template <typename T, int BITS>
__global__ void __launch_bounds__(kWarps * 32) dequant_kernel(Operands op, T* __restrict__ wout) {
  __shared__ T tile[kWarps][16][64 + 2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (K + op.group_size - 1) / op.group_size, Tk = (K + 63) >> 6;
  const int tn = blockIdx.y, kt = blockIdx.x * kWarps + warp;
  if (kt < Tk) {
    uint32_t w[BITS];
    load_words<BITS>(w, op.qweight + (static_cast<size_t>(tn) * Tk + kt) * 32 * BITS + lane * BITS);
    const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
    const T* zp = op.zeros ? static_cast<const T*>(op.zeros) + static_cast<size_t>(tn) * G * 16 : nullptr;
    const float zdef = static_cast<float>(1 << (BITS - 1));
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const int kk = kt * 64 + step * 16;
      const int grp = min(kk, K - 1) / op.group_size;
      const float z_lo = zp ? Num<T>::f(zp[grp * 16 + g]) : zdef, z_hi = zp ? Num<T>::f(zp[grp * 16 + g + 8]) : zdef;
      uint32_t a[4];
      dequant_step<T, BITS>(a, w, step, row_params<T, BITS>(sc[grp * 16 + g], sc[grp * 16 + g + 8], z_lo, z_hi));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i & 1), c = step * 16 + 2 * tig + 8 * (i >> 1);
        *reinterpret_cast<uint32_t*>(&tile[warp][r][c]) = a[i];
      }
    }
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
      const int n = tn * 16 + r, k = kt * 64 + 2 * lane;
      if (n < N && k < K)
        *reinterpret_cast<uint32_t*>(wout + static_cast<size_t>(n) * K + k) =
            *reinterpret_cast<const uint32_t*>(&tile[warp][r][2 * lane]);
    }
  }
}

// W[r, c] += alpha * S[r, c]: one thread per entry (entries are unique, so no races).
template <typename T>
__global__ void merge_ortho_kernel(Operands op, T* __restrict__ wout) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= op.nnz) return;
  int lo = 0, hi = op.N;  // largest r with row_ptr[r] <= e
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (op.row_ptr[mid] <= e) lo = mid; else hi = mid;
  }
  const int c = op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e])
                         : static_cast<const int32_t*>(op.col_idx)[e];
  T* p = wout + static_cast<size_t>(lo) * op.K + c;
  *p = Num<T>::from(Num<T>::f(*p) + op.alpha * Num<T>::f(static_cast<const T*>(op.values)[e]));
}

template <typename T, int BITS>
cudaError_t fused_dispatch_nt(const Operands& op, const void* x, const void* bias, void* out, int M,
                              cudaStream_t s) {
  const dim3 grid((op.N + 15) / 16), block(kWarps * 32);
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto op_ = static_cast<T*>(out);
  if (M <= 8) fused_small_m_kernel<T, BITS, 1><<<grid, block, 0, s>>>(op, xp, bp, op_, M);
  else if (M <= 16) fused_small_m_kernel<T, BITS, 2><<<grid, block, 0, s>>>(op, xp, bp, op_, M);
  else if (M <= 32) fused_small_m_kernel<T, BITS, 4><<<grid, block, 0, s>>>(op, xp, bp, op_, M);
  else fused_small_m_kernel<T, BITS, 8><<<grid, block, 0, s>>>(op, xp, bp, op_, M);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fused_dispatch(const Operands& op, const void* x, const void* bias, void* out, int M,
                           cudaStream_t s) {
  switch (op.bits) {
    case 2: return fused_dispatch_nt<T, 2>(op, x, bias, out, M, s);
    case 3: return fused_dispatch_nt<T, 3>(op, x, bias, out, M, s);
    case 4: return fused_dispatch_nt<T, 4>(op, x, bias, out, M, s);
    case 8: return fused_dispatch_nt<T, 8>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dequant_dispatch(const Operands& op, void* w, cudaStream_t s) {
  const int Tk = (op.K + 63) / 64;
  const dim3 grid((Tk + kWarps - 1) / kWarps, (op.N + 15) / 16), block(kWarps * 32);
  T* wp = static_cast<T*>(w);
  switch (op.bits) {
    case 2: dequant_kernel<T, 2><<<grid, block, 0, s>>>(op, wp); break;
    case 3: dequant_kernel<T, 3><<<grid, block, 0, s>>>(op, wp); break;
    case 4: dequant_kernel<T, 4><<<grid, block, 0, s>>>(op, wp); break;
    case 8: dequant_kernel<T, 8><<<grid, block, 0, s>>>(op, wp); break;
    default: return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || op.alpha == 0.f || op.nnz == 0) return err;
  const int threads = 256;
  merge_ortho_kernel<T><<<static_cast<unsigned>((op.nnz + threads - 1) / threads), threads, 0, s>>>(op, wp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_small_m(const Operands& op, const void* x, const void* bias, void* out, int M,
                                 cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? fused_dispatch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : fused_dispatch<__half>(op, x, bias, out, M, stream);
}

cudaError_t launch_dequant_merge(const Operands& op, void* w, cudaStream_t stream) {
  if (op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? dequant_dispatch<__nv_bfloat16>(op, w, stream) : dequant_dispatch<__half>(op, w, stream);
}

}  // namespace libortho
