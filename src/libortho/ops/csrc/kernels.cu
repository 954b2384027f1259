// LibOrtho CUDA kernels: the fused dual-stream GEMM for small M (decode) and the dequantize-and-merge
// kernel for large M (prefill). Layout of the packed base: see libortho/quant.py. In short, a warp reads
// one 16x64 tile as 32*BITS consecutive words; lane l's words hold exactly the A-operand fragments of
// four mma.m16n8k16 steps, so the weights go from one wide load to tensor-core registers with no
// shared-memory round trip. The activations are the B operand (the "swap AB" trick for small M).
#include <algorithm>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include "kernels.h"

namespace libortho {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;       // warps per block, each sweeping its share of the K tiles

// f(std::integral_constant<int, BITS>{}) for the supported widths: the one place that maps the runtime
// bit width to the kernels' template argument.
template <typename F>
cudaError_t with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

// Programmatic dependent launch (Hopper; LIBORTHO_PDL=1, v1 only, off by default). A kernel launched with
// it may start while the previous kernel in the stream drains. Before griddepcontrol.wait it only issues
// L2 prefetches of its own weight strip (hints: no value read before the wait is ever used, so results
// cannot depend on the overlap); it triggers its own dependents right after the wait. Without PDL, or
// before sm_90, both instructions are no-ops.
__device__ inline void pdl_prologue(const void* strip, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const char* p = static_cast<const char*>(strip);
  for (int off = threadIdx.x * 128; off < bytes; off += blockDim.x * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

struct DeviceInfo {
  int sms = 0;
  bool cc90 = false;
};

// SM count and sm_90 flag of the current device, cached per device.
inline DeviceInfo device_info() {
  static DeviceInfo cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return DeviceInfo{132, false};
  if (cache[dev].sms == 0) {
    int sms = 0, major = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cache[dev].cc90 = major >= 9;
    cache[dev].sms = sms > 0 ? sms : 132;
  }
  return cache[dev];
}

// cp.async copies global -> shared without registers (sm_80+; plain copies before).
__device__ inline void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// 4 bytes to shared memory of which the first `src_bytes` (0..4) are read, the rest zero-filled.
__device__ inline void cp_async4_part(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
#else
  uint32_t v = 0u;
  memcpy(&v, src, src_bytes);
  *static_cast<uint32_t*>(dst) = v;
#endif
}

__device__ inline void cp_async4(void* dst, const void* src, bool valid) { cp_async4_part(dst, src, valid ? 4 : 0); }

__device__ inline void cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ inline void cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <typename T> struct Num;
template <> struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 in both halves: 0x4300 | q == 128 + q
  static constexpr float kMagicF = 128.f;
  __device__ static float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  __device__ static T2 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  __device__ static T2 pair2(__nv_bfloat16 v) { return __halves2bfloat162(v, v); }
  __device__ static __nv_bfloat16 bits(uint32_t u) { return __ushort_as_bfloat16(static_cast<unsigned short>(u)); }
};
template <> struct Num<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0: 0x6400 | q == 1024 + q
  static constexpr float kMagicF = 1024.f;
  __device__ static float f(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
  __device__ static T2 pair(float a, float b) { return __floats2half2_rn(a, b); }
  __device__ static T2 pair2(__half v) { return __halves2half2(v, v); }
  __device__ static __half bits(uint32_t u) { return __ushort_as_half(static_cast<unsigned short>(u)); }
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
  float fs_lo, fs_hi, fz_lo, fz_hi;               // floats: generic path (scales: both)
};

template <typename T, int BITS>
__device__ inline RowParams<T> row_params(T s_lo, T s_hi, float z_lo, float z_hi) {
  RowParams<T> p;
  p.fs_lo = Num<T>::f(s_lo);  // also the INT4 path's scales when they are applied after the products
  p.fs_hi = Num<T>::f(s_hi);
  if constexpr (BITS == 4) {
    p.s_lo = Num<T>::pair2(s_lo);
    p.s_hi = Num<T>::pair2(s_hi);
    p.zm_lo = Num<T>::pair(Num<T>::kMagicF + z_lo, Num<T>::kMagicF + z_lo);
    p.zm_hi = Num<T>::pair(Num<T>::kMagicF + z_hi, Num<T>::kMagicF + z_hi);
  } else {
    p.fz_lo = z_lo;
    p.fz_hi = z_hi;
  }
  return p;
}

// magic + z in both halves, from z's 16-bit pattern: one PRMT and one add instead of a conversion to fp32,
// an fp32 add and a pack (the same single rounding of the exact sum; exact for the integer zeros).
template <typename T>
__device__ inline typename Num<T>::T2 magic_plus(uint32_t zbits) {
  using T2 = typename Num<T>::T2;
  return __hadd2(as_t2<T2>(__byte_perm(zbits, 0u, 0x1010)), as_t2<T2>(Num<T>::kMagic));
}

// INT4 row parameters from the 16-bit patterns of the scales and zeros (no zeros: the default 8, whose
// magic + 8 is the magic with 8 in each half's low bits).
template <typename T, bool kScaled>
__device__ inline RowParams<T> row_params4(uint32_t s_lo, uint32_t s_hi, uint32_t z_lo, uint32_t z_hi, bool hz) {
  using T2 = typename Num<T>::T2;
  RowParams<T> p;
  p.fs_lo = Num<T>::f(Num<T>::bits(s_lo));
  p.fs_hi = Num<T>::f(Num<T>::bits(s_hi));
  if (kScaled) {
    p.s_lo = Num<T>::pair2(Num<T>::bits(s_lo));
    p.s_hi = Num<T>::pair2(Num<T>::bits(s_hi));
  }
  const T2 zdef = as_t2<T2>(Num<T>::kMagic + 0x00080008u);
  p.zm_lo = hz ? magic_plus<T>(z_lo) : zdef;
  p.zm_hi = hz ? magic_plus<T>(z_hi) : zdef;
  return p;
}

// (a & b) | c in one instruction (the compiler splits it in two when b and c are both immediates).
__device__ inline uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// A fragment (4 registers of 2 values) of k16 step `step` from the lane's words.
// Register i holds fragment elements (2i, 2i+1): row g + 8*(i%2), columns 2*tig + 8*(i/2) + {0,1};
// they sit at slots i and i+4 of the step. kScaled = false leaves out the scale: the values are the
// exact integers q - z (the caller applies the scale to the fp32 products).
template <typename T, int BITS, bool kScaled = true>
__device__ inline void dequant_step(uint32_t (&a)[4], const uint32_t (&w)[BITS], int step, const RowParams<T>& p) {
  using T2 = typename Num<T>::T2;
  if constexpr (BITS == 4) {
    const uint32_t word = w[step];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // (magic + q) - (magic + z) is exact; one rounding in the product, as (q - z) * s would have.
      T2 v = as_t2<T2>(and_or(word >> (4 * i), 0x000F000Fu, Num<T>::kMagic));
      v = __hsub2(v, (i & 1) ? p.zm_hi : p.zm_lo);
      if (kScaled) v = __hmul2(v, (i & 1) ? p.s_hi : p.s_lo);
      a[i] = as_u32(v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = kScaled ? ((i & 1) ? p.fs_hi : p.fs_lo) : 1.f, z = (i & 1) ? p.fz_hi : p.fz_lo;
      const float v0 = (static_cast<float>(code_at<BITS>(w, 8 * step + i)) - z) * s;
      const float v1 = (static_cast<float>(code_at<BITS>(w, 8 * step + 4 + i)) - z) * s;
      a[i] = as_u32(Num<T>::pair(v0, v1));
    }
  }
}

// Group of a column, computed once per tile. Every supported group size is a multiple of 32 or the whole
// row, so steps {0,1} of a tile share a group and so do steps {2,3}; when the size is a multiple of 64
// (or the whole row) all four do. A power of two is a shift: the integer division it replaces cost ~20
// instructions per tile half in the hot loop.
struct GroupIndex {
  int shift;  // log2(group size) for a power of two, 31 for one group per row, -1: divide
  int size, K;
  bool same;  // both halves of every tile in one group
  __device__ GroupIndex(int group_size, int K_) : size(group_size), K(K_) {
    const bool one = group_size >= K_, pow2 = (group_size & (group_size - 1)) == 0;
    shift = one ? 31 : pow2 ? __ffs(group_size) - 1 : -1;
    same = one || group_size % 64 == 0;
  }
  __device__ int of(int col) const {
    col = min(col, K - 1);
    return shift >= 0 ? col >> shift : col / size;
  }
};

// Scales (or zeros) of the two 32-column halves of a tile for rows g and g+8, as raw 16-bit patterns each
// in its own 32-bit register: held as T, two of them share a register and the merge (PRMT) waits for the
// load right where it is issued (ncu: most of v1's stall samples sat on those merges).
template <typename T>
__device__ inline void load_tile_params(uint32_t (&p)[2][2], const T* base, int kt, const GroupIndex& gi, int g) {
  const unsigned short* b0 = reinterpret_cast<const unsigned short*>(base) + gi.of(kt * 64) * 16 + g;
  p[0][0] = __ldg(b0);
  p[0][1] = __ldg(b0 + 8);
  if (!gi.same) {  // else half 1 is never read (compute_chunk uses half 0's); a copy here would wait too
    const unsigned short* b1 = reinterpret_cast<const unsigned short*>(base) + gi.of(kt * 64 + 32) * 16 + g;
    p[1][0] = __ldg(b1);
    p[1][1] = __ldg(b1 + 8);
  }
}

// Everything one warp needs for kU consecutive K tiles of its sweep (weights, scales, zeros and, for
// small M, the activation fragments), loaded together so a chunk costs one memory latency.
template <typename T, int BITS, int NT, int kU, bool kPrefetchX>
struct Chunk {
  uint32_t w[kU][BITS];
  uint32_t s[kU][2][2], z[kU][2][2];  // 16-bit patterns (see load_tile_params)
  uint32_t xb[kPrefetchX ? kU : 1][4][kPrefetchX ? NT : 1][2];
};

// B fragment of k16 step `step` of a tile from this lane's pairs of a row of x (xt: the row as 32-bit pairs,
// offset by tig and by the tile). Rows past M point at row 0: their products land in output columns that
// are never stored. K is even, so a pair lies entirely inside or outside the row; kFull (all but a short
// last tile) skips the check; k0 is the tile's first column.
template <bool kFull>
__device__ inline void x_fragment(uint32_t& b0, uint32_t& b1, const uint32_t* xt, int step, int k0, int tig, int K) {
  if (kFull) {
    b0 = __ldg(xt + step * 8);
    b1 = __ldg(xt + step * 8 + 4);
  } else {
    b0 = k0 + step * 16 + 2 * tig < K ? __ldg(xt + step * 8) : 0u;
    b1 = k0 + step * 16 + 8 + 2 * tig < K ? __ldg(xt + step * 8 + 4) : 0u;
  }
}

// Tiles kt0, kt0 + kWarps, ... (kU of them, those below Tk). kFull: all of them lie inside K.
template <bool kFull, typename T, int BITS, int NT, int kU, bool kPrefetchX>
__device__ inline void load_chunk(Chunk<T, BITS, NT, kU, kPrefetchX>& c, int kt0, int Tk, const int32_t* qtile,
                                  const T* sc, const T* zp, const uint32_t* xb, const int (&xo)[NT], int K,
                                  const GroupIndex& gi, int g, int tig) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int kt = kt0 + u * kWarps;
    if (kt >= Tk) break;
    load_words<BITS>(c.w[u], qtile + static_cast<size_t>(kt) * 32 * BITS);
    load_tile_params(c.s[u], sc, kt, gi, g);
    if (zp) load_tile_params(c.z[u], zp, kt, gi, g);
    if constexpr (kPrefetchX) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint32_t* xt = xb + (xo[t] + kt * 32);
#pragma unroll
        for (int step = 0; step < 4; ++step)
          x_fragment<kFull>(c.xb[u][step][t][0], c.xb[u][step][t][1], xt, step, kt * 64, tig, K);
      }
    }
  }
}

// acc[t] += the products of a tile, computed in tmp on the integers q - z and scaled here in fp32 (rows g
// and g+8 of the C fragment: registers {0,1} and {2,3}).
template <int NT>
__device__ inline void add_scaled(float (&acc)[NT][4], float (&tmp)[NT][4], float s_lo, float s_hi) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    acc[t][0] += s_lo * tmp[t][0];
    acc[t][1] += s_lo * tmp[t][1];
    acc[t][2] += s_hi * tmp[t][2];
    acc[t][3] += s_hi * tmp[t][3];
    tmp[t][0] = tmp[t][1] = tmp[t][2] = tmp[t][3] = 0.f;
  }
}

// kScaleAfter (NT <= 2): the scale multiplies the 4*NT fp32 products of a group's steps instead of each
// of the 16 dequantized pairs per tile (fewer instructions for few batch columns, and exact A values).
template <bool kFull, typename T, int BITS, int NT, int kU, bool kPrefetchX>
__device__ inline void compute_chunk(float (&acc)[NT][4], const Chunk<T, BITS, NT, kU, kPrefetchX>& c, int kt0,
                                     int Tk, const uint32_t* xb, const int (&xo)[NT], int K, bool has_zeros, bool same,
                                     int tig) {
  constexpr bool kScaleAfter = NT <= 2;
  const float zdef = static_cast<float>(1 << (BITS - 1));
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int kt = kt0 + u * kWarps;
    if (kt >= Tk) break;
    auto params = [&](int h) {
      if constexpr (BITS == 4)
        return row_params4<T, !kScaleAfter>(c.s[u][h][0], c.s[u][h][1], c.z[u][h][0], c.z[u][h][1], has_zeros);
      else
        return row_params<T, BITS>(Num<T>::bits(c.s[u][h][0]), Num<T>::bits(c.s[u][h][1]),
                                   has_zeros ? Num<T>::f(Num<T>::bits(c.z[u][h][0])) : zdef,
                                   has_zeros ? Num<T>::f(Num<T>::bits(c.z[u][h][1])) : zdef);
    };
    const RowParams<T> p0 = params(0);
    RowParams<T> p1 = p0;
    if (!same) p1 = params(1);
    float tmp[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) tmp[t][0] = tmp[t][1] = tmp[t][2] = tmp[t][3] = 0.f;
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      if (!kFull && kt * 64 + step * 16 >= K) break;
      if (kScaleAfter && step == 2 && !same) add_scaled(acc, tmp, p0.fs_lo, p0.fs_hi);
      uint32_t a[4];
      dequant_step<T, BITS, !kScaleAfter>(a, c.w[u], step, step < 2 ? p0 : p1);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t b0, b1;
        if constexpr (kPrefetchX) {
          b0 = c.xb[u][step][t][0];
          b1 = c.xb[u][step][t][1];
        } else {
          x_fragment<kFull>(b0, b1, xb + (xo[t] + kt * 32), step, kt * 64, tig, K);
        }
        mma<T>(kScaleAfter ? tmp[t] : acc[t], a, b0, b1);
      }
    }
    if (kScaleAfter) {
      // The last group the tile's steps touched: half 1 only if a step of it ran.
      const bool h1 = !same && (kFull || kt * 64 + 32 < K);
      add_scaled(acc, tmp, h1 ? p1.fs_lo : p0.fs_lo, h1 ? p1.fs_hi : p0.fs_hi);
    }
  }
}

// Adds alpha * this thread's run [run_b, run_e) of ortho entries times x (M <= MR rows) into out, the
// warp's own 16 rows of `stride` partial sums (red[warp]; the epilogue adds the warps up). Runs are
// contiguous and ordered by thread, so within a warp a row strictly inside a run is one thread's, and the
// first and last rows of runs are added up by a segmented scan on the (sorted) row keys: every row then
// gets one plain add from one lane, and rows shared with other warps land in their own slots. No atomics
// (shared-memory float atomics are compare-and-swap loops) and no block barrier before the epilogue's.
// MR > 16 (too many registers for the scan) adds each row partial with an atomic.
// x[0..MR) of column c from xt (MR values in one load; MR = the row stride of xt).
template <int MR, typename T>
__device__ inline void xt_column(float (&xv)[MR], const T* xt, int c) {
  const T* p = xt + static_cast<size_t>(c) * MR;
  uint32_t w[MR / 2];
  if constexpr (MR == 2) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (MR == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < MR / 8; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[i];
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  }
#pragma unroll
  for (int i = 0; i < MR / 2; ++i) {
    xv[2 * i] = Num<T>::f(Num<T>::bits(w[i] & 0xFFFFu));
    xv[2 * i + 1] = Num<T>::f(Num<T>::bits(w[i] >> 16));
  }
}

template <int MR, typename T, class ColAt, class ValAt>
__device__ inline void ortho_run(float* out, int stride, const int* rp, int run_b, int run_e, const T* x, int K,
                                 int M, float alpha, ColAt col_at, ValAt val_at, const T* xt = nullptr) {
  constexpr bool kScan = MR <= 16;
  float part[MR], first[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) part[m] = first[m] = 0.f;
  int row = 0;
#pragma unroll
  for (int i = 1; i < 16; ++i) row += (rp[i] <= run_b);
  const int row0 = row;
  // Before entry e: add up the partial sums of the rows e has moved past.
  auto flush = [&](int e) {
    if (e < rp[row + 1]) return;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (!kScan) {
        if (m < M) atomicAdd(&out[row * stride + m], alpha * part[m]);
      } else if (row == row0) {
        first[m] = part[m];
      } else if (m < M) {
        out[row * stride + m] += alpha * part[m];
      }
      part[m] = 0.f;
    }
    while (e >= rp[row + 1]) ++row;
  };
  // Rows 0..MR of x at column c: one load from xt (padded with zeros), or M loads K apart.
  auto load_x = [&](float (&xv)[MR], int c) {
    if constexpr (MR >= 2 && MR <= 16) {
      if (xt != nullptr) {
        xt_column<MR>(xv, xt, c);
        return;
      }
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) xv[m] = m < M ? Num<T>::f(x[static_cast<size_t>(m) * K + c]) : 0.f;
  };
  // kB entries at a time: all their loads (column, value, x) issue before the first add, so their
  // latencies overlap; one at a time, each entry's add waited on its own chain of three loads. Rows of
  // xv past M are zeros (their sums are never stored).
  constexpr int kB = MR <= 2 ? 4 : MR <= 8 ? 2 : 1;
  int e = run_b;
  if constexpr (MR <= 8) {
    for (; e + kB <= run_e; e += kB) {
      int c[kB];
      float v[kB], xv[kB][MR];
#pragma unroll
      for (int j = 0; j < kB; ++j) c[j] = col_at(e + j), v[j] = val_at(e + j);
#pragma unroll
      for (int j = 0; j < kB; ++j) load_x(xv[j], c[j]);
#pragma unroll
      for (int j = 0; j < kB; ++j) {
        flush(e + j);
#pragma unroll
        for (int m = 0; m < MR; ++m) part[m] += v[j] * xv[j][m];
      }
    }
  }
  for (; e < run_e; ++e) {
    const int c = col_at(e);
    const float v = val_at(e);
    flush(e);
    if constexpr (MR <= 16) {
      float xv[MR];
      load_x(xv, c);
#pragma unroll
      for (int m = 0; m < MR; ++m) part[m] += v * xv[m];
    } else {  // 64 values of x in registers would spill
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < M) part[m] += v * Num<T>::f(x[static_cast<size_t>(m) * K + c]);
    }
  }
  if constexpr (!kScan) {
    if (run_b < run_e)
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < M) atomicAdd(&out[row * stride + m], alpha * part[m]);
    return;
  }
  const int lane = threadIdx.x & 31;
  int key = run_b < run_e ? row : 16;                         // row of the last partial (16: empty run)
  const int fkey = run_b < run_e && row != row0 ? row0 : -1;  // row of the first partial, if separate
  // The next lane's first partial continues this lane's last row: fold it in.
  const int nk = __shfl_down_sync(0xffffffffu, fkey, 1);
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const float nv = __shfl_down_sync(0xffffffffu, first[m], 1);
    if (lane < 31 && nk >= 0 && nk == key) part[m] += nv;
  }
  // A first partial not folded into the previous lane: no other lane of the warp has that row.
  const int pk = __shfl_up_sync(0xffffffffu, key, 1);
  if (fkey >= 0 && (lane == 0 || pk != fkey))
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) out[fkey * stride + m] += alpha * first[m];
  // Segmented inclusive scan of the last partials: equal keys are adjacent (runs are ordered).
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int k2 = __shfl_up_sync(0xffffffffu, key, off);
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const float v2 = __shfl_up_sync(0xffffffffu, part[m], off);
      if (lane >= off && k2 == key) part[m] += v2;
    }
  }
  const int next = __shfl_down_sync(0xffffffffu, key, 1);
  if (key < 16 && (lane == 31 || next != key))
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) out[key * stride + m] += alpha * part[m];
}

// Column of CSR entry e (int16 or int32 column indices).
__device__ inline int col_at(const Operands& op, int e) {
  return op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e]) : static_cast<const int32_t*>(op.col_idx)[e];
}

// Tuning knobs of the v1 kernel (benchmarks/probes/v1_configs.py times alternatives): K tiles per chunk
// (two chunks in flight), whether x fragments are fetched with the chunk, the occupancy floor, and
// kStages > 0: INT4 weights, scales and zeros come through a per-warp ring of kStages tiles in shared
// memory filled by cp.async (kStages - 1 tiles in flight without holding registers; see ring_sweep);
// kXRows > 0: so do the tile's columns of x (M <= kXRows rows), read back with ldmatrix. A ring too large
// to sit beside the kernel's other static shared memory (~12 KB) under the 48 KB static limit lives in
// dynamic shared memory (kRingBytes; the x ring from 8 rows).
template <int kU_, bool kPrefetchX_, int kMinBlocks_, int kStages_ = 0, int kXRows_ = 0>
struct V1Cfg {
  static constexpr int kU = kU_;
  static constexpr bool kPrefetchX = kPrefetchX_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kStages = kStages_;
  static constexpr int kXRows = kXRows_;
  // per warp and slot: 512 weight bytes, 64 bytes of scales and zeros, 128 bytes per row of x
  static constexpr int kRingSize = kWarps * kStages_ * (512 + 64 + kXRows_ * 128);
  static constexpr bool kDynRing = kRingSize > 36 * 1024;
  static constexpr int kRingBytes = kDynRing ? kRingSize : 0;
};

// Four 8x8 16-bit matrices from shared memory, one row address per lane (lanes 8q..8q+7: matrix q):
// thread t gets row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1 of each, as mma's B fragments want them.
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// Elements between the scale rows of a warp's consecutive tiles (kWarps * 64 columns apart) for
// ring_sweep: a fixed number of groups when the group size is a power of two dividing that span, 0 for one
// group per row; -1 (other sizes): no ring.
__device__ inline int ring_pstep(const GroupIndex& gi) {
  constexpr int kSpan = kWarps * 64;
  if (gi.shift == 31) return 0;
  return gi.shift >= 0 && ((kSpan >> gi.shift) << gi.shift) == kSpan ? (kSpan >> gi.shift) * 16 : -1;
}

// One warp's full INT4 tiles (warp, warp + kWarps, ...; nt of them) through a ring of S slots in shared
// memory: each slot holds the tile's 512 weight bytes (16 per lane) and the 16 scales and 16 zeros of its
// group (tiles of one group only: the caller checks GroupIndex::same and ring_pstep). Tile j + S - 1 is
// requested while tile j is computed, so S - 1 tiles are in flight with no registers held for them; x
// fragments (L2 hits) are loaded one tile ahead into registers. `on_first` runs once, after the first
// requests (the ortho staging, whose cp.async group then sits among the ring's: the waits stay correct, one
// tile less deep).
// XR > 0 (M <= XR <= 8 NT): the tile's 64 columns of x's M rows come through the ring too (16-byte
// cp.async, XR / 4 per lane; 16-byte chunks XOR-swizzled by row so ldmatrix reads them without bank
// conflicts) and are read back with two ldmatrix.x4 per n8 column block instead of 8 global loads; rows
// past M read row 0. The caller checks that x rows are 16-byte aligned (K % 8 == 0, x aligned).
template <int S, int XR, typename T, int NT, bool kPrefetchX, class OnFirst>
__device__ inline void ring_sweep(float (&acc)[NT][4], uint4 (&wring)[S][32], uint32_t (&pring)[S][16],
                                  uint4 (*xring)[XR > 0 ? XR * 8 : 1], int nt, int warp, int lane,
                                  const int32_t* qtile, const T* sc, const T* zp, const uint32_t* xb,
                                  const int (&xo)[NT], const T* x, int M, int K, const GroupIndex& gi, int pstep,
                                  int g, int tig, OnFirst on_first) {
  static_assert(XR == 0 || (XR % 4 == 0 && XR <= 8 * NT && XR > 8 * (NT - 1)), "the x ring holds the kernel's rows");
  // Requests advance with running pointers and offsets (no index arithmetic per tile; pstep: see
  // ring_pstep). The sweep is unrolled over the ring (twice for an odd S), so every slot address is a
  // constant offset.
  const T* pbase = lane < 2 ? sc : zp;  // lanes 0-1: the 16 scales, 2-3: the 16 zeros (32 bytes each)
  const bool pcopy = lane < 4 && pbase != nullptr;
  if (pcopy) pbase += (lane & 1) * 8 + gi.of(warp * 64) * 16;
  int poff = 0;
  const int32_t* qn = qtile + static_cast<size_t>(warp) * 32 * 4;
  int jn = 0;
  // x ring: lane (rows xm + 4 i, chunk xc) copies 16 bytes of a tile's columns of each of its rows r to
  // chunk xc ^ (r % 8) of row r.
  const int xm = lane >> 3, xc = lane & 7;
  const T* xn_src = XR > 0 ? x + static_cast<size_t>(xm) * K + warp * 64 + xc * 8 : nullptr;
  auto issue = [&](int sn) {
    if (jn < nt) {
      cp_async16(&wring[sn][lane], qn, true);
      if (pcopy) cp_async16(&pring[sn][lane * 4], pbase + poff, true);
      if constexpr (XR > 0) {
#pragma unroll
        for (int i = 0; i < XR / 4; ++i) {
          const int r = xm + 4 * i;
          if (r < M)
            cp_async16(&xring[sn][r * 8 + (xc ^ (r & 7))],
                       xn_src + static_cast<size_t>(4 * i) * K + static_cast<size_t>(jn) * kWarps * 64, true);
        }
      }
    }
    cp_commit();  // an empty group past the end keeps the count of pending groups uniform
    ++jn;
    qn += kWarps * 32 * 4;
    poff += pstep;
  };
  const uint32_t* xn[NT];  // this lane's pairs of x at the next tile to fetch, per batch block
#pragma unroll
  for (int t = 0; t < NT; ++t) xn[t] = xb + xo[t] + warp * 32;
  auto load_x = [&](Chunk<T, 4, NT, 1, kPrefetchX>& c) {
    if constexpr (kPrefetchX && XR == 0) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int step = 0; step < 4; ++step)
          x_fragment<true>(c.xb[0][step][t][0], c.xb[0][step][t][1], xn[t], step, 0, tig, K);
        xn[t] += kWarps * 32;
      }
    }
  };
  const bool hz = zp != nullptr;
  // Tile j from slot `slot` into cur (x fragments already there), the next tile's x into nxt, the math.
  auto step = [&](int j, int slot, Chunk<T, 4, NT, 1, kPrefetchX>& cur, Chunk<T, 4, NT, 1, kPrefetchX>& nxt) {
    issue(slot == 0 ? S - 1 : slot - 1);  // tile j + S - 1
    cp_wait<S - 1>();
    __syncwarp();
    const uint4 w = wring[slot][lane];
    cur.w[0][0] = w.x; cur.w[0][1] = w.y; cur.w[0][2] = w.z; cur.w[0][3] = w.w;
    const unsigned short* ps = reinterpret_cast<const unsigned short*>(pring[slot]);
    cur.s[0][0][0] = ps[g];
    cur.s[0][0][1] = ps[g + 8];
    if (hz) {
      cur.z[0][0][0] = ps[16 + g];
      cur.z[0][0][1] = ps[24 + g];
    }
    if constexpr (XR > 0) {
      // Lane l addresses row 8 t + l % 8 (row 0 past M) of matrix l / 8: columns 8 (l / 8) (+ 32 for steps 2-3).
      const int q = lane >> 3;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int r = t * 8 + (lane & 7), m = r < M ? r : 0, sw = m & 7;
        uint32_t b[4];
        ldmatrix_x4(b, &xring[slot][m * 8 + (q ^ sw)]);
        cur.xb[0][0][t][0] = b[0]; cur.xb[0][0][t][1] = b[1]; cur.xb[0][1][t][0] = b[2]; cur.xb[0][1][t][1] = b[3];
        ldmatrix_x4(b, &xring[slot][m * 8 + ((q + 4) ^ sw)]);
        cur.xb[0][2][t][0] = b[0]; cur.xb[0][2][t][1] = b[1]; cur.xb[0][3][t][0] = b[2]; cur.xb[0][3][t][1] = b[3];
      }
    }
    if (j + 1 < nt) load_x(nxt);
    const int kt = warp + j * kWarps;
    compute_chunk<true>(acc, cur, kt, kt + 1, xb, xo, K, hz, true, tig);
    __syncwarp();  // every lane has read the slot before tile j + S refills it
  };
#pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);
  on_first();
  Chunk<T, 4, NT, 1, kPrefetchX> ca, cb;  // used in turn (no register copies of the x fragments)
  if (nt > 0) load_x(ca);
  constexpr int kUnroll = S % 2 == 0 ? S : 2 * S;  // even, so tile j's chunk is fixed by u's parity
  for (int j0 = 0; j0 < nt; j0 += kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; u += 2) {
      if (j0 + u >= nt) break;
      step(j0 + u, u % S, ca, cb);
      if (j0 + u + 1 >= nt) break;
      step(j0 + u + 1, (u + 1) % S, cb, ca);
    }
  }
}

template <int NT> using V1Default = V1Cfg<NT == 1 ? 2 : 1, NT <= 2, 2>;

template <typename T, int BITS, int NT, class Cfg = V1Default<NT>>
__global__ void __launch_bounds__(kWarps * 32, Cfg::kMinBlocks)
fused_small_m_kernel(Operands op, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                     int M) {
  constexpr int MT = NT * 8;                 // batch columns handled (padded)
  constexpr bool kPrefetchX = Cfg::kPrefetchX;  // activation fragments travel with the chunk
  constexpr int kU = Cfg::kU;                // K tiles per chunk; two chunks in flight (double buffer)
  // ortho entries a block stages in shared memory (rest: global); half with the x ring (configuration 8:
  // the 48 KB static limit; 9-10: less shared memory per block)
  constexpr int kStage = NT >= 8 || Cfg::kXRows > 0 ? 1024 : 2048;
  constexpr int kStageW = kStage / kWarps;  // per warp
  __shared__ float red[kWarps][16][MT + 1];  // per-warp partial sums (base, then + alpha * ortho)
  __shared__ int rpw[kWarps][17];            // the tile's row pointers, one copy per warp
  __shared__ int wmeta[kWarps][3];           // the block's entry range and the warp's first staged entry
  __shared__ uint32_t st_col[kWarps][kStageW];      // staged column indices (int16 pairs or int32)
  __shared__ uint32_t st_val[kWarps][kStageW / 2];  // staged values (pairs)

  const int tn = blockIdx.x, n0 = tn * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (op.K + op.group_size - 1) / op.group_size;
  const int Tk = (K + 63) >> 6;
  const int32_t* qtile = op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = static_cast<const T*>(op.zeros);
  if (zp) zp += static_cast<size_t>(tn) * G * 16;
  if (op.pdl) pdl_prologue(op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS, Tk * 32 * BITS * 4);

  // The ortho stream (skipped entirely when alpha == 0, the kill switch). The tile's entries are
  // flattened and cut into equal contiguous runs, one per thread, whatever the row lengths (a dense
  // row costs its tile no more than the same count spread over rows). Their columns and values (the
  // first kStage of the block) are copied to shared memory by cp.async once both weight chunks are in
  // flight: no registers held through the main loop, no load left to wait for after it. Nothing before
  // that waits on a row pointer (the block's entry range is read inside the staging, see stage_ortho).
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  int my_rp = 0;
  const bool csr_aligned = (reinterpret_cast<uintptr_t>(op.col_idx) | reinterpret_cast<uintptr_t>(op.values)) % 4 == 0;
  if (ortho && lane <= 16) my_rp = op.row_ptr[min(n0 + lane, N)];  // each warp keeps its own copy
  bool staged = !ortho;
  auto stage_ortho = [&]() {
    // The block's entry range is read here, after the weight loads: loaded at the top, the block-uniform
    // values went to uniform registers right away (R2UR), and that move waited for the loads before any
    // weight load was issued (ncu: 40 stall samples there at alpha = 1).
    // What the ortho runs need after the sweep goes to shared memory, not registers held through it.
    const int e_lo = op.row_ptr[n0], e_hi = op.row_ptr[min(n0 + 16, N)];
    const int per = (e_hi - e_lo + kWarps * 32 - 1) / (kWarps * 32);
    // The warp's entries (its threads' runs), 4-byte copies from an even entry by its own lanes; the last
    // word of an odd-length array is read half.
    const int wb = min(e_lo + warp * 32 * per, e_hi), we = min(wb + 32 * per, e_hi);
    const int st_base = wb & ~1;
    const int st_n = csr_aligned ? min(we - st_base, kStageW) : 0;
    if (lane == 0) wmeta[warp][0] = e_lo, wmeta[warp][1] = e_hi, wmeta[warp][2] = st_base;
    const int cw = op.col16 ? (st_n + 1) / 2 : st_n, vw = (st_n + 1) / 2;
    for (int w = lane; w < cw + vw; w += 32) {
      const bool is_col = w < cw;
      const int e0 = st_base + (is_col ? (op.col16 ? 2 * (w) : w) : 2 * (w - cw));
      const bool two = !is_col || op.col16;  // 2-byte elements: the word holds entries e0, e0 + 1
      const int bytes = two && e0 + 1 >= op.nnz ? 2 : 4;
      const char* src = is_col ? static_cast<const char*>(op.col_idx) + static_cast<size_t>(e0) * (op.col16 ? 2 : 4)
                               : static_cast<const char*>(op.values) + static_cast<size_t>(e0) * 2;
      cp_async4_part(is_col ? &st_col[warp][w] : &st_val[warp][w - cw], src, bytes);
    }
    cp_commit();
    staged = true;
  };
  float acc[NT][4];
  // This lane's rows of x (batch rows t*8 + g; past M: row 0) as offsets, in 32-bit pairs, from xb.
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(x) + tig;
  int xo[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    xo[t] = (t * 8 + g < M ? t * 8 + g : 0) * (K >> 1);
  }

  // Each warp sweeps the full K tiles warp, warp + kWarps, ... in chunks of kU tiles, loading the next
  // chunk while it computes the current one (two register buffers, used in turn); a short last tile
  // (K % 64 != 0) comes after the sweep, so the sweep needs no bounds checks.
  constexpr int stride = kWarps * kU;
  Chunk<T, BITS, NT, kU, kPrefetchX> ca, cb;
  const bool hz = zp != nullptr;
  const GroupIndex gi(op.group_size, K);
  const int Tf = K >> 6;
  bool swept = false;
  if constexpr (Cfg::kStages > 0 && BITS == 4) {
    constexpr int XR = Cfg::kXRows, S = Cfg::kStages;
    using WSlots = uint4[S][32];
    using PSlots = uint32_t[S][16];
    using XSlots = uint4[S][XR > 0 ? XR * 8 : 1];
    WSlots* wring;
    PSlots* pring;
    XSlots* xring;
    if constexpr (Cfg::kDynRing) {  // kRingBytes of dynamic shared memory: x, weights, scales and zeros
      extern __shared__ __align__(16) uint4 v1_ring[];
      xring = reinterpret_cast<XSlots*>(v1_ring);
      wring = reinterpret_cast<WSlots*>(v1_ring + kWarps * S * XR * 8);
      pring = reinterpret_cast<PSlots*>(v1_ring + kWarps * S * (XR * 8 + 32));
    } else {
      __shared__ __align__(16) uint4 wring_s[kWarps][S][32];
      __shared__ __align__(16) uint32_t pring_s[kWarps][S][16];
      __shared__ __align__(16) uint4 xring_s[kWarps][S][XR > 0 ? XR * 8 : 1];
      wring = wring_s;
      pring = pring_s;
      xring = xring_s;
    }
    const int pstep = ring_pstep(gi);
    const bool x_ok = XR == 0 || (M <= XR && K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0);
    if (gi.same && pstep >= 0 && x_ok) {
      const int nt = warp < Tf ? (Tf - warp + kWarps - 1) / kWarps : 0;
      ring_sweep<S, XR, T, NT, kPrefetchX>(acc, wring[warp], pring[warp], xring[warp], nt, warp, lane,
                                                     qtile, sc, zp, xb, xo, x, M, K, gi, pstep, g, tig,
                                                     [&] { if (!staged) stage_ortho(); });
      swept = true;
    }
  }
  if (!swept && warp < Tf) load_chunk<true>(ca, warp, Tf, qtile, sc, zp, xb, xo, K, gi, g, tig);
  for (int kt0 = warp; !swept && kt0 < Tf; kt0 += 2 * stride) {
    if (kt0 + stride < Tf) load_chunk<true>(cb, kt0 + stride, Tf, qtile, sc, zp, xb, xo, K, gi, g, tig);
    if (!staged) stage_ortho();
    compute_chunk<true>(acc, ca, kt0, Tf, xb, xo, K, hz, gi.same, tig);
    if (kt0 + stride >= Tf) break;
    if (kt0 + 2 * stride < Tf) load_chunk<true>(ca, kt0 + 2 * stride, Tf, qtile, sc, zp, xb, xo, K, gi, g, tig);
    compute_chunk<true>(acc, cb, kt0 + stride, Tf, xb, xo, K, hz, gi.same, tig);
  }
  if (Tf < Tk && warp == Tf % kWarps) {
    Chunk<T, BITS, NT, 1, kPrefetchX> ct;
    load_chunk<false>(ct, Tf, Tk, qtile, sc, zp, xb, xo, K, gi, g, tig);
    compute_chunk<false>(acc, ct, Tf, Tk, xb, xo, K, hz, gi.same, tig);
  }

  // C fragment: c0,c1 -> row g, batch columns 2*tig, 2*tig+1; c2,c3 -> row g+8.
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    red[warp][g][t * 8 + 2 * tig] = acc[t][0];
    red[warp][g][t * 8 + 2 * tig + 1] = acc[t][1];
    red[warp][g + 8][t * 8 + 2 * tig] = acc[t][2];
    red[warp][g + 8][t * 8 + 2 * tig + 1] = acc[t][3];
  }
  if (!staged) stage_ortho();  // a warp without K tiles
  if (ortho) {
    // The warp adds alpha times its threads' runs into its own red slot, as soon as its sweep is done.
    // Per-row loops sized to M (1, 2, 4, 8 within the kernel's MT): loops over all MT padded rows cost
    // ~200 instructions per entry at M = 1 (ncu, 4096x4096, 1 %).
    if (lane <= 16) rpw[warp][lane] = my_rp;
    cp_wait<0>();
    __syncwarp();
    const int e_lo = wmeta[warp][0], e_hi = wmeta[warp][1], st_base = wmeta[warp][2];
    const int per = (e_hi - e_lo + kWarps * 32 - 1) / (kWarps * 32);
    const int run_b = min(e_lo + static_cast<int>(threadIdx.x) * per, e_hi), run_e = min(run_b + per, e_hi);
    const int st_n = csr_aligned ? min(min(e_lo + (warp + 1) * 32 * per, e_hi) - st_base, kStageW) : 0;
    auto entry_col = [&](int e) {
      const int i = e - st_base;
      if (i >= st_n) return col_at(op, e);
      return op.col16 ? static_cast<int>(reinterpret_cast<const int16_t*>(st_col[warp])[i])
                      : static_cast<int>(st_col[warp][i]);
    };
    auto entry_val = [&](int e) {
      const int i = e - st_base;
      return Num<T>::f(i < st_n ? reinterpret_cast<const T*>(st_val[warp])[i] : static_cast<const T*>(op.values)[e]);
    };
    auto run = [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      // xt is laid out for this MR (the binding picks ld by the same rule) or not given
      const T* xt = op.xt != nullptr && op.xt_ld == MR ? static_cast<const T*>(op.xt) : nullptr;
      ortho_run<MR>(&red[warp][0][0], MT + 1, rpw[warp], run_b, run_e, x, K, M, op.alpha, entry_col, entry_val, xt);
    };
    if constexpr (MT == 8) {
      if (M == 1) run(std::integral_constant<int, 1>{});
      else if (M <= 2) run(std::integral_constant<int, 2>{});
      else if (M <= 4) run(std::integral_constant<int, 4>{});
      else run(std::integral_constant<int, 8>{});
    } else {
      run(std::integral_constant<int, MT>{});
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * M; i += blockDim.x) {
    const int r = i & 15, m = i >> 4, n = n0 + r;
    if (n >= N) continue;
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) y += red[w][r][m];
    if (bias) y += Num<T>::f(bias[n]);
    out[static_cast<size_t>(m) * N + n] = Num<T>::from(y);
  }
}

// Large-M path: W (N, K) = deq(Q) + alpha * S in the activation dtype, for cuBLAS. A block owns a strip of
// 16 rows and a range of K tiles; its 8 warps decode 8 consecutive 16x64 tiles into shared memory, add
// the ortho entries that fall in those 512 columns there, then write the tiles out in 16-byte stores, so
// W is written exactly once. The columns of a CSR row ascend (checked when a layer is packed or loaded),
// so each row keeps a cursor that only moves forward: every entry is read once per block.
// The first entry in [lo, hi) of an ascending CSR row whose column is >= c (hi if none).
__device__ inline int first_col_at_least(const Operands& op, int lo, int hi, int c) {
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (col_at(op, mid) < c) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kWarps * 32) dequant_merge_kernel(Operands op, T* __restrict__ wout,
                                                                    int tiles_per_block) {
  constexpr int kPitch = 64 + 8;  // keeps rows 16-byte aligned; pairs written by a warp hit 32 banks
  __shared__ __align__(16) T tile[kWarps][16][kPitch];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (K + op.group_size - 1) / op.group_size, Tk = (K + 63) >> 6;
  const int tn = blockIdx.y, kt_begin = blockIdx.x * tiles_per_block, kt_end = min(Tk, kt_begin + tiles_per_block);
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  const bool vec = (K & 7) == 0;  // 16-byte stores need 8-element aligned rows
  const int32_t* qstrip = op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = op.zeros ? static_cast<const T*>(op.zeros) + static_cast<size_t>(tn) * G * 16 : nullptr;
  const float zdef = static_cast<float>(1 << (BITS - 1));
  __shared__ int cursor[16];  // per row: the first CSR entry not yet merged
  if (ortho && threadIdx.x < 16) {
    const int n = tn * 16 + threadIdx.x;
    if (n < N) cursor[threadIdx.x] = first_col_at_least(op, op.row_ptr[n], op.row_ptr[n + 1], kt_begin * 64);
  }
  uint32_t w[BITS];
  if (kt_begin + warp < kt_end) load_words<BITS>(w, qstrip + static_cast<size_t>(kt_begin + warp) * 32 * BITS);
  for (int base = kt_begin; base < kt_end; base += kWarps) {
    const int kt = base + warp;
    if (kt < kt_end) {
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        const int grp = min(kt * 64 + step * 16, K - 1) / op.group_size;
        const float z_lo = zp ? Num<T>::f(zp[grp * 16 + g]) : zdef, z_hi = zp ? Num<T>::f(zp[grp * 16 + g + 8]) : zdef;
        uint32_t a[4];
        dequant_step<T, BITS>(a, w, step, row_params<T, BITS>(sc[grp * 16 + g], sc[grp * 16 + g + 8], z_lo, z_hi));
#pragma unroll
        for (int i = 0; i < 4; ++i)
          *reinterpret_cast<uint32_t*>(&tile[warp][g + 8 * (i & 1)][step * 16 + 2 * tig + 8 * (i >> 1)]) = a[i];
      }
      if (kt + kWarps < kt_end) load_words<BITS>(w, qstrip + static_cast<size_t>(kt + kWarps) * 32 * BITS);
    }
    if (ortho) {
      __syncthreads();
      const int c_hi = min(K, min(kt_end, base + kWarps) * 64);
      for (int rr = warp; rr < 16; rr += kWarps) {
        const int n = tn * 16 + rr;
        if (n >= N) break;
        const int end = op.row_ptr[n + 1];
        int e0 = cursor[rr];
        while (e0 < end) {  // entries below c_hi form a prefix of what is left of the row
          const int e = e0 + lane;
          const int c = e < end ? col_at(op, e) : K;
          const bool mine = c < c_hi;
          if (mine) {
            T& t = tile[(c >> 6) - base][rr][c & 63];
            t = Num<T>::from(Num<T>::f(t) + op.alpha * Num<T>::f(static_cast<const T*>(op.values)[e]));
          }
          const int taken = __popc(__ballot_sync(0xffffffffu, mine));
          e0 += taken;
          if (taken < 32) break;
        }
        if (lane == 0) cursor[rr] = e0;
      }
      __syncthreads();
    }
    if (kt < kt_end) {
      if (vec) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // 16 rows x 8 vectors of 8 values
          const int v = i * 32 + lane, r = v >> 3, n = tn * 16 + r, k = kt * 64 + (v & 7) * 8;
          if (n < N && k < K)
            *reinterpret_cast<uint4*>(wout + static_cast<size_t>(n) * K + k) =
                *reinterpret_cast<const uint4*>(&tile[warp][r][(v & 7) * 8]);
        }
      } else {
        for (int r = 0; r < 16; ++r) {
          const int n = tn * 16 + r, k = kt * 64 + 2 * lane;
          if (n < N && k < K)
            *reinterpret_cast<uint32_t*>(wout + static_cast<size_t>(n) * K + k) =
                *reinterpret_cast<const uint32_t*>(&tile[warp][r][2 * lane]);
        }
      }
      __syncwarp();  // the next chunk overwrites this warp's tile
    }
  }
}

template <typename T>
cudaError_t launch_v1(void (*kernel)(Operands, const T*, const T*, T*, int), const Operands& op, const void* x,
                      const void* bias, void* out, int M, cudaStream_t s, int smem = 0) {
  const dim3 grid((op.N + 15) / 16), block(kWarps * 32);
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto op_ = static_cast<T*>(out);
  if (!op.pdl) {
    kernel<<<grid, block, smem, s>>>(op, xp, bp, op_, M);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = s;
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, op, xp, bp, op_, M);
}

// A v1 configuration whose ring lives in dynamic shared memory: the kernel is allowed its kRingBytes (over
// the default 48 KB) once per device before its first launch.
template <typename T, int NT, class Cfg>
cudaError_t launch_v1_dyn(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s) {
  constexpr auto kernel = fused_small_m_kernel<T, 4, NT, Cfg>;
  static bool allowed[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
  if (!allowed[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kRingBytes);
    if (err != cudaSuccess) return err;
    allowed[dev] = true;
  }
  return launch_v1<T>(kernel, op, x, bias, out, M, s, Cfg::kRingBytes);
}

// The largest M of each v1 configuration below (cuda.py V1_CONFIG_MAX_M mirrors it).
constexpr int kV1CfgMaxM[] = {8, 8, 8, 8, 8, 8, 16, 16, 4, 8, 16};
constexpr int kV1Cfgs = sizeof(kV1CfgMaxM) / sizeof(kV1CfgMaxM[0]);

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
    case 8: return launch_v1<T>(fused_small_m_kernel<T, 4, 1, V1Cfg<1, true, 3, 4, 4>>, op, x, bias, out, M, s);
    // the x ring for M <= 8 and M <= 16 (dynamic shared memory: 51 / 84 KB of ring per block)
    case 9: return launch_v1_dyn<T, 1, V1Cfg<1, true, 3, 4, 8>>(op, x, bias, out, M, s);
    case 10: return launch_v1_dyn<T, 2, V1Cfg<1, true, 2, 4, 16>>(op, x, bias, out, M, s);
    default: return cudaErrorInvalidValue;
  }
}

// The INT4 v1 configuration for each class of call (kernels.h, set_v1_table), as the probe
// (benchmarks/probes/v1_configs.py, results/v1-configs-H200.json, 2026-11-29 11:03 UTC) suggested it:
// the 4-slot ring carrying x's columns, its 4-row form at M <= 4, 8 rows at M 5-8, 16 rows at M 9-16.
// cuda.py replaces entries for a tuning run ($LIBORTHO_V1_CFG).
int g_v1_table[kV1Classes] = {8, 8, 9, 8, 9, 10};

inline int v1_class(const Operands& op, int M) {
  if (M > 8) return 5;
  if ((op.N + 15) / 16 >= 3 * device_info().sms) return M <= 4 ? 3 : 4;
  if (M > 4) return 2;
  return op.K >= 8192 ? 0 : 1;
}

template <typename T, int BITS>
cudaError_t fused_dispatch_nt(const Operands& op, const void* x, const void* bias, void* out, int M,
                              cudaStream_t s) {
  if constexpr (BITS == 4)
    if (M <= 16) return fused_cfg_dispatch<T>(op, x, bias, out, M, g_v1_table[v1_class(op, M)], s);
  auto kernel = M <= 8 ? fused_small_m_kernel<T, BITS, 1> : M <= 16 ? fused_small_m_kernel<T, BITS, 2>
               : M <= 32 ? fused_small_m_kernel<T, BITS, 4> : fused_small_m_kernel<T, BITS, 8>;
  return launch_v1<T>(kernel, op, x, bias, out, M, s);
}

template <typename T>
cudaError_t fused_dispatch(const Operands& op, const void* x, const void* bias, void* out, int M,
                           cudaStream_t s) {
  return with_bits(op.bits, [&](auto b) { return fused_dispatch_nt<T, decltype(b)::value>(op, x, bias, out, M, s); });
}

template <typename T>
cudaError_t dequant_dispatch(const Operands& op, void* w, cudaStream_t s) {
  // Whole rows per block when there are enough 16-row strips, else K split so ~512 blocks fill the SMs.
  const int Tk = (op.K + 63) / 64, strips = (op.N + 15) / 16;
  const int want = static_cast<int>((static_cast<int64_t>(Tk) * strips + 511) / 512);
  const int tpb = std::min(Tk, std::max(kWarps, (want + kWarps - 1) / kWarps * kWarps));
  const dim3 grid((Tk + tpb - 1) / tpb, strips), block(kWarps * 32);
  T* wp = static_cast<T*>(w);
  return with_bits(op.bits, [&](auto b) {
    dequant_merge_kernel<T, decltype(b)::value><<<grid, block, 0, s>>>(op, wp, tpb);
    return cudaGetLastError();
  });
}

// ---------------------------------------------------------------------------------------------------
// Decode kernel v2 (LIBORTHO_DECODE_KERNEL=v2): the same math as fused_small_m_kernel, organised for
// bytes in flight instead of registers.
//
// * A block owns R tile rows (16R outputs) and a contiguous range of K tiles; its 8 warps are laid out
//   as R rows x KW = 8/R K-lanes. The K range is cut into stages of KC = 2*KW tiles; a stage holds, in
//   shared memory, the R x KC weight tiles, the scales/zeros of the groups they touch and the slice of
//   x they multiply (M rows, zero-filled past K). All 256 threads fill stages with 16-byte cp.async
//   (no registers held by loads in flight), kStages deep, one __syncthreads per stage.
// * R grows with M (1, 2, 4, 8 for M <= 2, 8, 16, 64) so that x, re-read from L2 once per block, stays
//   small next to the weights. When that leaves too few blocks for the SMs (small N, or M = 16), the K
//   range is split over a thread-block cluster of C <= 8 blocks (sm_90), whose partial sums are added
//   through distributed shared memory: no workspace, no atomics, no second kernel.
// * The ortho (CSR) stream runs right after the first stages are issued, so its latency hides behind
//   the weight fetch. Rows go to warps by where their first entry falls in an equal-nnz cut of the
//   block's (cluster's) entries, so a warp gets whole rows and about the same number of entries; a
//   warp sweeps its rows' entries 32 at a time (coalesced col/value loads) and adds them up per row
//   with a segmented shuffle scan. Every sum has a fixed order: results are bitwise reproducible.
//   At alpha == 0 nothing of the CSR arrays is read.
namespace v2 {

constexpr int kThreads = 256, kW = 8, kStages = 4, kU = 2;  // kU: K tiles per warp per stage

// Byte offsets of the dynamic shared memory of one block; the host sizes the launch with the same code.
struct Layout {
  int KC, XS, ng;                 // K tiles per stage, x row stride (elements), group slots per tile row
  int s_off, z_off, x_off, stage;  // inside a stage (weights at 0); bytes per stage
  int p_off, rp_off, total;        // after the stages: partial sums (fp32, M x 16R), CSR row pointers
};

__host__ __device__ inline Layout make_layout(int R, int M, int bits, bool has_zeros, int MT) {
  Layout L;
  L.KC = (kW / R) * kU;
  L.XS = L.KC * 64 + 8;  // +16 bytes: the 8 batch rows of a B fragment read fall in distinct banks
  L.ng = 2 * L.KC + 1;   // groups (>= 32 columns each) a stage of KC*64 columns can touch
  const int sbytes = R * L.ng * 16 * 2;
  L.s_off = R * L.KC * 128 * bits;
  L.z_off = L.s_off + sbytes;
  L.x_off = L.z_off + (has_zeros ? sbytes : 0);
  L.stage = L.x_off + M * L.XS * 2;
  const int pipe = kStages * L.stage, red = kW * 16 * (MT + 1) * 4;  // the warp reduction reuses the stages
  L.p_off = ((pipe > red ? pipe : red) + 15) & ~15;
  L.rp_off = L.p_off + R * 16 * M * 4;
  L.total = L.rp_off + (R * 16 + 1) * 4;
  return L;
}

template <int BITS>
__device__ inline void load_words_smem(uint32_t (&w)[BITS], const uint32_t* p) {
  if constexpr (BITS == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(p), u = *reinterpret_cast<const uint4*>(p + 4);
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w; w[4] = u.x; w[5] = u.y; w[6] = u.z; w[7] = u.w;
  } else if constexpr (BITS == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x; w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = p[i];
  }
}

// Fill stage `s` (K tiles kb + s*KC ..) of this block: weights, scales (and zeros), x.
template <typename T, int BITS>
__device__ inline void issue_stage(unsigned char* st, const Operands& op, const T* x, const Layout& L, int s,
                                   int kb, int ke, int tn0, int R, int M, int Nt, int Tk, bool x16) {
  const int K = op.K, gs = op.group_size, G = (K + gs - 1) / gs, KC = L.KC;
  const int kt0 = kb + s * KC, nkt = min(KC, ke - kt0);
  constexpr int CPT = 8 * BITS;  // 16-byte chunks per tile
  const int per_row = nkt * CPT;
  for (int q = threadIdx.x; q < R * per_row; q += kThreads) {
    const int r = q / per_row, j = q - r * per_row;
    if (tn0 + r < Nt)
      cp_async16(st + (r * KC * CPT + j) * 16,
                 op.qweight + (static_cast<size_t>(tn0 + r) * Tk + kt0) * 32 * BITS + j * 4, true);
  }
  const int klo = kt0 * 64, khi = min((kt0 + nkt) * 64, K);
  const int gf = klo / gs, ngs = (khi - 1) / gs - gf + 1;
  const T* sc = static_cast<const T*>(op.scales);
  const T* zp = static_cast<const T*>(op.zeros);
  for (int q = threadIdx.x; q < R * ngs * 2; q += kThreads) {
    const int r = q / (ngs * 2), j = q - r * ngs * 2;
    if (tn0 + r < Nt) {
      const size_t off = (static_cast<size_t>(tn0 + r) * G + gf) * 16 + j * 8;
      const int d = (r * L.ng * 16 + j * 8) * 2;
      cp_async16(st + L.s_off + d, sc + off, true);
      if (zp) cp_async16(st + L.z_off + d, zp + off, true);
    }
  }
  const int cols = nkt * 64;  // staged columns; those >= K are zero-filled
  if (x16) {
    const int cpr = cols / 8;
    for (int q = threadIdx.x; q < M * cpr; q += kThreads) {
      const int m = q / cpr, c = klo + (q - m * cpr) * 8;
      const bool ok = c < K;
      cp_async16(st + L.x_off + (m * L.XS + (c - klo)) * 2, ok ? x + static_cast<size_t>(m) * K + c : x, ok);
    }
  } else {
    const int cpr = cols / 2;
    for (int q = threadIdx.x; q < M * cpr; q += kThreads) {
      const int m = q / cpr, c = klo + (q - m * cpr) * 2;
      const bool ok = c < K;
      cp_async4(st + L.x_off + (m * L.XS + (c - klo)) * 2, ok ? x + static_cast<size_t>(m) * K + c : x, ok);
    }
  }
}

// One warp's tiles of stage s: acc += deq(W tile) x slice, through mma.m16n8k16 (x is the B operand).
template <typename T, int BITS, int NT>
__device__ inline void compute_stage(float (&acc)[NT][4], const unsigned char* st, const Layout& L, int s, int kb,
                                     int ke, int r, int kw, int K, int gs, int M, bool has_zeros) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int KC = L.KC, kt0 = kb + s * KC, nkt = min(KC, ke - kt0), gf = kt0 * 64 / gs;
  const uint32_t* wsm = reinterpret_cast<const uint32_t*>(st) + (r * KC) * 32 * BITS + lane * BITS;
  const T* ss = reinterpret_cast<const T*>(st + L.s_off) + r * L.ng * 16;
  const T* zs = reinterpret_cast<const T*>(st + L.z_off) + r * L.ng * 16;
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(st + L.x_off);
  const int xsw = L.XS / 2;  // row stride in 32-bit words
  const float zdef = static_cast<float>(1 << (BITS - 1));
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int j = kw * kU + u;
    if (j >= nkt) break;
    const int kt = kt0 + j;
    uint32_t w[BITS];
    load_words_smem<BITS>(w, wsm + j * 32 * BITS);
    const bool full = kt * 64 + 64 <= K;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int grp = min(kt * 64 + 32 * h, K - 1) / gs - gf;
      const RowParams<T> p = row_params<T, BITS>(ss[grp * 16 + g], ss[grp * 16 + g + 8],
                                                 has_zeros ? Num<T>::f(zs[grp * 16 + g]) : zdef,
                                                 has_zeros ? Num<T>::f(zs[grp * 16 + g + 8]) : zdef);
#pragma unroll
      for (int step = 2 * h; step < 2 * h + 2; ++step) {
        if (!full && kt * 64 + step * 16 >= K) break;
        uint32_t a[4];
        dequant_step<T, BITS>(a, w, step, p);
        const int wo = (j * 64 + step * 16) / 2 + tig;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int m = t * 8 + g;
          const uint32_t b0 = m < M ? xs[m * xsw + wo] : 0u, b1 = m < M ? xs[m * xsw + wo + 4] : 0u;
          mma<T>(acc[t], a, b0, b1);
        }
      }
    }
  }
}

// First row in [0, rows) whose part (equal-nnz cut of the block's entries) is >= p; rows if none.
__device__ inline int first_row_of_part(const int* rp, int rows, int e_lo, int per, int parts, int p) {
  int lo = 0, hi = rows;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const int pm = min((rp[mid] - e_lo) / per, parts - 1);
    if (pm >= p) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// This warp's share of the ortho stream: P[m * rows + row] = sum over the row's entries of v * x[m, c].
template <typename T>
__device__ inline void ortho_rows(float* P, const int* rp, const Operands& op, const T* x, int rows, int M,
                                  int part, int parts) {
  const int lane = threadIdx.x & 31;
  const int e_lo = rp[0], e_hi = rp[rows];
  const int per = (e_hi - e_lo + parts - 1) / parts;
  const int ra = first_row_of_part(rp, rows, e_lo, per, parts, part);
  const int rb = first_row_of_part(rp, rows, e_lo, per, parts, part + 1);
  const int ea = rp[ra], eb = rp[rb];
  const T* vals = static_cast<const T*>(op.values);
  for (int base = ea; base < eb; base += 32) {
    const int e = base + lane;
    const bool valid = e < eb;
    int c = 0, row = rows;  // invalid lanes: a row of their own, past the end
    float v = 0.f;
    if (valid) {
      c = op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e])
                   : static_cast<const int32_t*>(op.col_idx)[e];
      v = Num<T>::f(vals[e]);
      int lo = ra, hi = rb - 1;  // last row in [ra, rb) with rp[row] <= e
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (rp[mid] <= e) lo = mid; else hi = mid - 1;
      }
      row = lo;
    }
    // Segmented inclusive scan over the lanes (rows are non-decreasing across lanes): which steps add.
    unsigned add = 0u;
#pragma unroll
    for (int k = 0; k < 5; ++k) {
      const int other = __shfl_up_sync(0xffffffffu, row, 1 << k);
      if (lane >= (1 << k) && other == row) add |= 1u << k;
    }
    const bool last = __shfl_down_sync(0xffffffffu, row, 1) != row || lane == 31;
    for (int m = 0; m < M; ++m) {
      float val = valid ? v * Num<T>::f(x[static_cast<size_t>(m) * op.K + c]) : 0.f;
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        const float o = __shfl_up_sync(0xffffffffu, val, 1 << k);
        if (add & (1u << k)) val += o;
      }
      if (valid && last) P[m * rows + row] += val;
    }
    __syncwarp();
  }
}

// Occupancy floor: 4 blocks/SM at M <= 8 (64 registers), 2 at M <= 16 (ptxas -v: no spills).
template <typename T, int BITS, int NT>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 4 : NT == 2 ? 2 : 1) decode_kernel(Operands op, const T* __restrict__ x,
                                                          const T* __restrict__ bias, T* __restrict__ out, int M,
                                                          int R, int x16) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int MT = NT * 8;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, Tk = (K + 63) >> 6, Nt = (N + 15) >> 4;
  const int C = gridDim.x, rank = blockIdx.x;  // K split over the cluster (C == 1: no split)
  const int tn0 = blockIdx.y * R, rows = R * 16;
  const bool hz = op.zeros != nullptr;
  const Layout L = make_layout(R, M, BITS, hz, MT);
  const int kb = static_cast<int>(static_cast<int64_t>(Tk) * rank / C);
  const int ke = static_cast<int>(static_cast<int64_t>(Tk) * (rank + 1) / C);
  const int nst = (ke - kb + L.KC - 1) / L.KC;
  const int r = warp % R, kw = warp / R;
  const bool r_ok = tn0 + r < Nt;
  float* P = reinterpret_cast<float*>(smem + L.p_off);
  int* rp = reinterpret_cast<int*>(smem + L.rp_off);
  const bool ortho = op.alpha != 0.f && op.nnz > 0;  // the kill switch: alpha == 0 reads no CSR array
  if (ortho)
    for (int i = tid; i <= rows; i += kThreads) rp[i] = op.row_ptr[min(tn0 * 16 + i, N)];

#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nst) issue_stage<T, BITS>(smem + s * L.stage, op, x, L, s, kb, ke, tn0, R, M, Nt, Tk, x16 != 0);
    cp_commit();
  }

  if (ortho) {
    for (int i = tid; i < rows * M; i += kThreads) P[i] = 0.f;
    __syncthreads();
    if (rp[rows] > rp[0]) ortho_rows<T>(P, rp, op, x, rows, M, rank * kW + warp, C * kW);
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll 1
  for (int s = 0; s < nst; ++s) {
    cp_wait<kStages - 2>();
    __syncthreads();  // stage s landed for every thread; stage s-1's buffer is free
    if (s + kStages - 1 < nst)
      issue_stage<T, BITS>(smem + ((s + kStages - 1) % kStages) * L.stage, op, x, L, s + kStages - 1, kb, ke, tn0,
                           R, M, Nt, Tk, x16 != 0);
    cp_commit();
    if (r_ok) compute_stage<T, BITS, NT>(acc, smem + (s % kStages) * L.stage, L, s, kb, ke, r, kw, K,
                                         op.group_size, M, hz);
  }
  cp_wait<0>();
  __syncthreads();

  // C fragment: c0,c1 -> row g, batch columns 2*tig, 2*tig+1; c2,c3 -> row g+8.
  float* red = reinterpret_cast<float*>(smem);  // [warp][16][MT + 1], over the idle stage buffers
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    red[(warp * 16 + g) * (MT + 1) + t * 8 + 2 * tig] = acc[t][0];
    red[(warp * 16 + g) * (MT + 1) + t * 8 + 2 * tig + 1] = acc[t][1];
    red[(warp * 16 + g + 8) * (MT + 1) + t * 8 + 2 * tig] = acc[t][2];
    red[(warp * 16 + g + 8) * (MT + 1) + t * 8 + 2 * tig + 1] = acc[t][3];
  }
  __syncthreads();
  const int KW = kW / R;
  for (int i = tid; i < rows * M; i += kThreads) {
    const int m = i / rows, row = i - m * rows, rr = row & 15, w0 = row >> 4;
    float y = 0.f;
    for (int k = 0; k < KW; ++k) y += red[((k * R + w0) * 16 + rr) * (MT + 1) + m];
    if (ortho) y += op.alpha * P[i];
    if (C == 1) {
      const int n = tn0 * 16 + row;
      if (n < N) {
        if (bias) y += Num<T>::f(bias[n]);
        out[static_cast<size_t>(m) * N + n] = Num<T>::from(y);
      }
    } else {
      P[i] = y;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) {  // add the cluster's partial sums, in rank order, through distributed shared memory
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int i = rank * kThreads + tid; i < rows * M; i += kThreads * C) {
      const int m = i / rows, row = i - m * rows, n = tn0 * 16 + row;
      if (n >= N) continue;
      float y = 0.f;
      for (int j = 0; j < C; ++j) y += cluster.map_shared_rank(P, j)[i];
      if (bias) y += Num<T>::f(bias[n]);
      out[static_cast<size_t>(m) * N + n] = Num<T>::from(y);
    }
    cluster.sync();  // no block leaves while another still reads its shared memory
  }
#endif
}

template <typename T, int BITS, int NT>
cudaError_t launch_nt(const Operands& op, const T* x, const T* bias, T* out, int M, cudaStream_t s) {
  auto kern = decode_kernel<T, BITS, NT>;
  const int R = M <= 2 ? 1 : M <= 8 ? 2 : M <= 16 ? 4 : 8;
  const int Nt = (op.N + 15) / 16, Tk = (op.K + 63) / 64, blocks = (Nt + R - 1) / R;
  const bool x16 = op.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const Layout L = make_layout(R, M, BITS, op.zeros != nullptr, NT * 8);
  const DeviceInfo d = device_info();
  static int smem_set[64];  // per device: the dynamic shared memory this instantiation may use
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (L.total > 48 * 1024 && (dev >= 64 || smem_set[dev] < L.total)) {
    err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, L.total);
    if (err != cudaSuccess) return err;
    if (dev < 64) smem_set[dev] = L.total;
  }
  // Split K over a cluster when the tile rows alone leave SMs idle (about 1.5 blocks per SM wanted);
  // every rank keeps at least one full stage.
  static int binary_version = -1;  // clusters need device code built for sm_90+
  if (binary_version < 0) {
    cudaFuncAttributes fa;
    binary_version = cudaFuncGetAttributes(&fa, kern) == cudaSuccess ? fa.binaryVersion : 0;
    (void)cudaGetLastError();
  }
  int C = 1;
  if (d.cc90 && binary_version >= 90 && 2 * blocks < 3 * d.sms) {
    C = (3 * d.sms + 2 * blocks - 1) / (2 * blocks);
    C = min(C, 8);
    C = min(C, max(1, Tk / L.KC));
  }
  dim3 grid(C, blocks), block(kThreads);
  if (C > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = static_cast<size_t>(L.total);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    err = cudaLaunchKernelEx(&cfg, kern, op, x, bias, out, M, R, static_cast<int>(x16));
    if (err == cudaSuccess) return cudaGetLastError();
    (void)cudaGetLastError();  // the cluster did not fit: run without the split
    grid.x = 1;
  }
  kern<<<grid, block, L.total, s>>>(op, x, bias, out, M, R, static_cast<int>(x16));
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_bits(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s) {
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto op_ = static_cast<T*>(out);
  if (M <= 8) return launch_nt<T, BITS, 1>(op, xp, bp, op_, M, s);
  if (M <= 16) return launch_nt<T, BITS, 2>(op, xp, bp, op_, M, s);
  if (M <= 32) return launch_nt<T, BITS, 4>(op, xp, bp, op_, M, s);
  return launch_nt<T, BITS, 8>(op, xp, bp, op_, M, s);
}

template <typename T>
cudaError_t launch(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s) {
  return with_bits(op.bits, [&](auto b) { return launch_bits<T, decltype(b)::value>(op, x, bias, out, M, s); });
}

}  // namespace v2

// ---------------------------------------------------------------------------------------------------
// Decode kernel v3 (LIBORTHO_DECODE_KERNEL=v3), for M = 1..4 (correct up to 16): a bandwidth-bound GEMV,
// no tensor cores. At M <= 4 the mma in v1/v2 does at most 4 useful columns of 8, and their time goes to
// latency (few bytes in flight per SM, dependent scale/x loads), not to math.
//
// Bytes per call: the packed base N*K*bits/8 (+ (N/16)*G*32 bytes of scales, the same again for zeros),
// plus 4 bytes per ortho entry when alpha != 0; x (M*K*2 bytes) and the output are noise. 4096x4096 INT4
// g128: 8.39 MB + 0.26 MB; at the H200's ~3.3 TB/s read bandwidth that is ~2.6 us (bf16 F.linear moves
// 33.6 MB: 3.76x more). Why it should get there: the whole matrix is requested at once. A block owns one
// tile row (16 outputs) and a contiguous K range; the grid is sized (cluster split-K, C <= 8 ranks) to
// >= 2 blocks per SM, and each warp issues all U tiles of its chunk (U 16-byte loads per lane plus the
// tiles' scales) before anything waits, i.e. ~16 KB per resident block in flight: with >= 2-3 blocks
// per SM that exceeds what Little's law asks of 3.3 TB/s x ~1 us (~25 KB per SM).
//
// * Packed layout read as stored: a warp reads a tile as its 32*BITS contiguous words (one coalesced
//   512-byte load at INT4); lane l holds rows g, g+8 (g = l/4) at the 16 tile columns of tig = l%4. The
//   sum over k is order-free, so each lane multiplies its codes by the matching x and the 4 lanes of a
//   row are added at the end (two shuffles); no reordering of the format is needed.
// * x: the block's K slice is staged once in shared memory as fp32, permuted so that the 4 columns a
//   lane pairs with one code word of a k16 step (2tig, +1, +8, +9) are one float4 (conflict-free).
// * Dequantization without int->float conversions: a code at bit b < 20 of a word becomes a float by
//   OR-ing an exponent over it (value 2^(23-b) + q, exact), and one FADD of (2^(23-b) + z) gives q - z
//   exactly; the per-(row, group) scale multiplies the fp32 dot product once per 32 columns.
// * Ortho stream (alpha != 0 only; nothing of it is read otherwise): the tile row's entries are cut into
//   C*8 equal contiguous parts, one per warp of the cluster; a warp takes its part 32*B entries at a
//   time, lane-strided (coalesced), and issues all B (col, val) loads, then all B*M x gathers, then the
//   FMAs; rows are summed with a segmented shuffle scan. Fixed partition and fixed summation order
//   everywhere (warps, then cluster ranks through distributed shared memory): bitwise reproducible.
// * Falls back to v1 when M > 16, or when a rank's slice (x in fp32, mostly) cannot fit kSmemBudget with
//   <= 8 ranks (g128 with clusters: v1 above K = 6656 at M = 16, 9728 at M = 12, 15360 at M = 8, 32256
//   at M = 4; without clusters M = 16 already above K ~ 832),
//   or when the cluster launch fails while the split is needed for that fit.
namespace v3 {

constexpr int kThreads = 256, kW = 8;
constexpr int kSmemBudget = 72 * 1024;  // bytes per block (x slice, scales, sums): >= 3 blocks per SM

// Shared memory, in floats: x slice [M][nk][16] float4, scales and zeros of the slice's groups [ng][16]
// (fp32), per-warp base sums and ortho sums [kW][16][M], the block's total [16][M] (read by the cluster's
// other ranks), per-warp copies of the 17 row pointers.
struct Smem {
  int sc, zp, red, p, l, rp, bytes;
};

__host__ __device__ inline Smem smem_layout(int nk, int M, int gs, int K) {
  const int ng = min((K + gs - 1) / gs, (nk * 64 + gs - 1) / gs + 1);  // groups a slice can touch
  Smem s;
  s.sc = M * nk * 64;
  s.zp = s.sc + ng * 16;
  s.red = s.zp + ng * 16;
  s.p = s.red + kW * 16 * M;
  s.l = s.p + kW * 16 * M;
  s.rp = s.l + 16 * M;
  s.bytes = (s.rp + kW * 17) * 4;
  return s;
}

// Tiles i0 .. i0+U-1 of this warp's list (tile i is qrow + i*kW tiles), all issued before any is used.
// (Scales and zeros come from shared memory: in registers they cost more than the weights.)
template <int BITS, int U>
__device__ inline void load_chunk(uint32_t (&w)[U][BITS], int i0, int nw, const int32_t* qrow) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (i0 + u >= nw) break;
    load_words<BITS>(w[u], qrow + static_cast<size_t>(i0 + u) * kW * 32 * BITS);
  }
}

// (code v of the lane's bit stream) - z, exact; v is a compile-time constant after unrolling.
template <int BITS>
__device__ __forceinline__ float code_minus_z(const uint32_t (&w)[BITS], int v, float z) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const int pos = BITS * v, idx = pos >> 5, off = pos & 31;
  if (off + BITS > 32) {  // straddles two words (INT3): assemble, then the 2^23 magic
    const uint32_t c = ((w[idx] >> off) | (w[idx + 1] << (32 - off))) & mask;
    return __uint_as_float(c | 0x4B000000u) - (8388608.f + z);
  }
  const uint32_t src = off < 16 ? w[idx] : w[idx] >> 16;  // keep the code below bit 20
  const int b = off & 15;
  const uint32_t e = static_cast<uint32_t>(150 - b) << 23;  // 2^(23-b): the code's lsb weighs 1
  return __uint_as_float((src & (mask << b)) | e) - (__uint_as_float(e) + z);
}

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t u) {
  if constexpr (Num<T>::kMagic == 0x43004300u) {  // bf16 is the top half of an fp32
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
  } else {
    return __half22float2(as_t2<__half2>(u));
  }
}

// acc[r][m] += sum over the chunk's tiles of deq(W)[row g + 8r, lane's columns] * x[m, same columns].
template <int BITS, int U, int MP>
__device__ inline void compute_chunk(float (&acc)[2][MP], const uint32_t (&w)[U][BITS], int i0, int nw, int warp,
                                     const float4* xs, int nk, int M, const float* ss, const float* zs, int c0,
                                     int gs, int K, int g, int tig) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (i0 + u >= nw) break;
    const int kl = warp + (i0 + u) * kW;  // tile inside the block's K range
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int gi = (min(c0 + kl * 64 + 32 * h, K - 1) / gs - c0 / gs) * 16 + g;  // slice-relative group
      const float zl = zs[gi], zh = zs[gi + 8];
      float dl[MP], dh[MP];
#pragma unroll
      for (int m = 0; m < MP; ++m) dl[m] = dh[m] = 0.f;
#pragma unroll
      for (int step = 2 * h; step < 2 * h + 2; ++step) {
        // Slot n of a step: row g + 8*(n&1), column 2tig + (n>>2) + 8*((n>>1)&1), i.e. float4 lane
        // x: n = 0,1; y: 4,5; z: 2,3; w: 6,7 (libortho/quant.py, slot order 0,2,4,6,1,3,5,7).
        float d[8];
#pragma unroll
        for (int n = 0; n < 8; ++n) d[n] = code_minus_z<BITS>(w[u], 8 * step + n, (n & 1) ? zh : zl);
#pragma unroll
        for (int m = 0; m < MP; ++m) {
          if (m < M) {
            const float4 xv = xs[(m * nk + kl) * 16 + step * 4 + tig];
            dl[m] += d[0] * xv.x + d[4] * xv.y + d[2] * xv.z + d[6] * xv.w;
            dh[m] += d[1] * xv.x + d[5] * xv.y + d[3] * xv.z + d[7] * xv.w;
          }
        }
      }
      const float sl = ss[gi], sh = ss[gi + 8];
#pragma unroll
      for (int m = 0; m < MP; ++m) {
        acc[0][m] += sl * dl[m];
        acc[1][m] += sh * dh[m];
      }
    }
  }
}

// This warp's part of the tile row's ortho entries: Pw[row * M + m] = sum of v * x[m, c] over them.
template <typename T, int MP>
__device__ inline void ortho_part(float* Pw, int* rp, const Operands& op, const T* x, int n0, int M, int part, int parts) {
  constexpr int B = MP <= 2 ? 4 : MP == 4 ? 2 : 1;  // entries per lane per batch (registers: v, c, B*M x)
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < 16 * M; i += 32) Pw[i] = 0.f;
  if (lane <= 16) rp[lane] = op.row_ptr[min(n0 + lane, op.N)];  // the warp's own copy: no block barrier
  __syncwarp();
  const int e_lo = rp[0], e_hi = rp[16];
  if (e_hi <= e_lo) return;
  const int per = (e_hi - e_lo + parts - 1) / parts;
  const int pb = min(e_lo + part * per, e_hi), pe = min(pb + per, e_hi);
  const T* vals = static_cast<const T*>(op.values);
  for (int base = pb; base < pe; base += 32 * B) {
    int c[B];
    float v[B], xv[B][MP];
#pragma unroll
    for (int i = 0; i < B; ++i) {  // all (col, val) loads first ...
      const int e = base + 32 * i + lane;
      const bool ok = e < pe;
      c[i] = ok ? (op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e])
                            : static_cast<const int32_t*>(op.col_idx)[e]) : 0;
      v[i] = ok ? Num<T>::f(vals[e]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < B; ++i)  // ... then all x gathers ...
#pragma unroll
      for (int m = 0; m < MP; ++m) xv[i][m] = m < M ? Num<T>::f(__ldg(x + static_cast<size_t>(m) * op.K + c[i])) : 0.f;
#pragma unroll
    for (int i = 0; i < B; ++i) {  // ... then the products, summed per row (rows ascend with the lane)
      const int e = base + 32 * i + lane;
      int row = 16;  // past the part: a row of its own
      if (e < pe) {  // last row with rp[row] <= e
        int lo = 0, hi = 15;
        while (lo < hi) {
          const int mid = (lo + hi + 1) >> 1;
          if (rp[mid] <= e) lo = mid; else hi = mid - 1;
        }
        row = lo;
      }
      unsigned add = 0u;
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        const int other = __shfl_up_sync(full, row, 1 << k);
        if (lane >= (1 << k) && other == row) add |= 1u << k;
      }
      const bool last = __shfl_down_sync(full, row, 1) != row || lane == 31;
#pragma unroll
      for (int m = 0; m < MP; ++m) {
        if (m >= M) break;
        float val = v[i] * xv[i][m];
#pragma unroll
        for (int k = 0; k < 5; ++k) {
          const float o = __shfl_up_sync(full, val, 1 << k);
          if (add & (1u << k)) val += o;
        }
        if (row < 16 && last) Pw[row * M + m] += val;
      }
      __syncwarp();
    }
  }
}

// Occupancy floor: 4 blocks/SM at M = 1 (64 registers), 3 to M = 4, 2 above (ptxas -v: no spills up to
// M = 8; M = 16 at INT2/3/4 spills 4 bytes).
template <typename T, int BITS, int MP>
__global__ void __launch_bounds__(kThreads, MP == 1 ? 4 : MP <= 4 ? 3 : 2)
gemv_v3_kernel(Operands op, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, int M,
               int x16) {
  extern __shared__ __align__(16) float sm3[];
  // Tiles per chunk: 4 16-byte loads per lane in flight (2 at M > 4, whose accumulators need the registers).
  constexpr int U = BITS == 8 || MP > 4 ? 2 : 4;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, gs = op.group_size, G = (K + gs - 1) / gs, Tk = (K + 63) >> 6;
  const int C = gridDim.x, rank = blockIdx.x, tn = blockIdx.y, n0 = tn * 16;
  const int kb = static_cast<int>(static_cast<int64_t>(Tk) * rank / C);
  const int nk = static_cast<int>(static_cast<int64_t>(Tk) * (rank + 1) / C) - kb;
  const Smem L = smem_layout((Tk + C - 1) / C, M, gs, K);
  float* xs = sm3;
  float* red = sm3 + L.red;
  float* P = sm3 + L.p;
  int* rps = reinterpret_cast<int*>(sm3 + L.rp);
  const bool hz = op.zeros != nullptr;
  const bool ortho = op.alpha != 0.f && op.nnz > 0;  // the kill switch: alpha == 0 reads no CSR array

  // 1. This warp's first chunk of weights: tiles kb + warp + i*kW of the tile row.
  const int nw = warp < nk ? (nk - warp + kW - 1) / kW : 0;
  const int32_t* qrow = op.qweight + (static_cast<size_t>(tn) * Tk + kb + warp) * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = hz ? static_cast<const T*>(op.zeros) + static_cast<size_t>(tn) * G * 16 : nullptr;
  uint32_t w[U][BITS];
  if (nw > 0) load_chunk<BITS, U>(w, 0, nw, qrow);

  // 2. While they fly: stage the slice's scales and zeros (zeros = 2^(bits-1) if symmetric), and
  //    x[:, kb*64 .. +nk*64) as fp32 in the lane-friendly order (zeros past K).
  const int k0 = kb * 64, cols = nk * 64;
  float* ss = sm3 + L.sc;
  float* zs = sm3 + L.zp;
  if (nk > 0) {
    const int g0 = k0 / gs, ng = (min(k0 + cols, K) - 1) / gs - g0 + 1;
    const float zdef = static_cast<float>(1 << (BITS - 1));
    for (int i = tid; i < ng * 16; i += kThreads) {
      ss[i] = Num<T>::f(sc[g0 * 16 + i]);
      zs[i] = hz ? Num<T>::f(zp[g0 * 16 + i]) : zdef;
    }
  }
  if (x16) {  // 8 columns per 16-byte load: one (step, half) of a tile, tig 0..3
    const int per_row = cols / 8;
#pragma unroll 4
    for (int q = tid; q < M * per_row; q += kThreads) {
      const int m = q / per_row, c = (q - m * per_row) * 8;
      const uint4 v = k0 + c < K ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + k0 + c))
                                 : make_uint4(0u, 0u, 0u, 0u);
      float* dst = xs + ((m * nk + (c >> 6)) * 16 + ((c >> 4) & 3) * 4) * 4 + ((c >> 3) & 1) * 2;
      *reinterpret_cast<float2*>(dst) = to_float2<T>(v.x);
      *reinterpret_cast<float2*>(dst + 4) = to_float2<T>(v.y);
      *reinterpret_cast<float2*>(dst + 8) = to_float2<T>(v.z);
      *reinterpret_cast<float2*>(dst + 12) = to_float2<T>(v.w);
    }
  } else {  // K even: pairs
    const int per_row = cols / 2;
#pragma unroll 4
    for (int q = tid; q < M * per_row; q += kThreads) {
      const int m = q / per_row, c = (q - m * per_row) * 2;
      const uint32_t v = k0 + c < K ? __ldg(reinterpret_cast<const unsigned int*>(x + static_cast<size_t>(m) * K + k0 + c)) : 0u;
      float* dst = xs + ((m * nk + (c >> 6)) * 16 + ((c >> 4) & 3) * 4 + ((c >> 1) & 3)) * 4 + ((c >> 3) & 1) * 2;
      *reinterpret_cast<float2*>(dst) = to_float2<T>(v);
    }
  }

  // 3. The ortho part, its latency also under the weight loads in flight.
  if (ortho) ortho_part<T, MP>(P + warp * 16 * M, rps + warp * 17, op, x, n0, M, rank * kW + warp, C * kW);
  __syncthreads();

  // 4. The base stream, chunk by chunk (the next chunk is fetched while other warps compute).
  float acc[2][MP];
#pragma unroll
  for (int m = 0; m < MP; ++m) acc[0][m] = acc[1][m] = 0.f;
  const float4* xs4 = reinterpret_cast<const float4*>(xs);
  for (int i0 = 0; i0 < nw; i0 += U) {
    if (i0 > 0) load_chunk<BITS, U>(w, i0, nw, qrow);
    compute_chunk<BITS, U, MP>(acc, w, i0, nw, warp, xs4, nk, M, ss, zs, k0, gs, K, g, tig);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int m = 0; m < MP; ++m) {
      acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], 1);
      acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], 2);
    }
  if (tig == 0)
#pragma unroll
    for (int m = 0; m < MP; ++m)
      if (m < M) {
        red[(warp * 16 + g) * M + m] = acc[0][m];
        red[(warp * 16 + g + 8) * M + m] = acc[1][m];
      }
  __syncthreads();

  // 5. Warps in order, then (C > 1) the cluster's ranks in order.
  float* tot = sm3 + L.l;
  for (int i = tid; i < 16 * M; i += kThreads) {
    float y = 0.f, o = 0.f;
#pragma unroll
    for (int j = 0; j < kW; ++j) y += red[j * 16 * M + i];
    if (ortho) {
#pragma unroll
      for (int j = 0; j < kW; ++j) o += P[j * 16 * M + i];
      y += op.alpha * o;
    }
    const int row = i / M, m = i - row * M, n = n0 + row;
    if (C == 1) {
      if (n < N) out[static_cast<size_t>(m) * N + n] = Num<T>::from(bias ? y + Num<T>::f(bias[n]) : y);
    } else {
      tot[i] = y;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) {
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int i = rank * kThreads + tid; i < 16 * M; i += kThreads * C) {
      const int row = i / M, m = i - row * M, n = n0 + row;
      if (n >= N) continue;
      float y = 0.f;
      for (int j = 0; j < C; ++j) y += cluster.map_shared_rank(tot, j)[i];
      out[static_cast<size_t>(m) * N + n] = Num<T>::from(bias ? y + Num<T>::f(bias[n]) : y);
    }
    cluster.sync();  // no block leaves while another still reads its shared memory
  }
#endif
}

template <typename T, int BITS, int MP>
cudaError_t launch_mp(const Operands& op, const T* x, const T* bias, T* out, int M, cudaStream_t s) {
  auto kern = gemv_v3_kernel<T, BITS, MP>;
  const int Nt = (op.N + 15) / 16, Tk = (op.K + 63) / 64;
  static int binary_version = -1;  // clusters need device code built for sm_90+
  if (binary_version < 0) {
    cudaFuncAttributes fa;
    binary_version = cudaFuncGetAttributes(&fa, kern) == cudaSuccess ? fa.binaryVersion : 0;
    (void)cudaGetLastError();
  }
  const DeviceInfo d = device_info();  // SM count and sm_90 flag, cached per device
  const bool clusters = d.cc90 && binary_version >= 90;
  // Fewest ranks whose slice fits the shared-memory budget; more to reach ~2 blocks per SM, while every
  // warp of a rank keeps at least one tile.
  const int gs = op.group_size, K = op.K;
  int c_fit = 1;
  while (c_fit <= 8 && smem_layout((Tk + c_fit - 1) / c_fit, M, gs, K).bytes > kSmemBudget) ++c_fit;
  if (c_fit > (clusters ? 8 : 1)) return launch_fused_small_m(op, x, bias, out, M, s);
  int C = 1;
  if (clusters) C = max(c_fit, min(min((2 * d.sms + Nt - 1) / Nt, 8), max(1, Tk / kW)));
  const bool x16 = op.K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  static int smem_set[64];  // per device: the dynamic shared memory this instantiation may use
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  auto go = [&](int c) -> cudaError_t {
    const int bytes = smem_layout((Tk + c - 1) / c, M, gs, K).bytes;
    if (bytes > 48 * 1024 && (dev >= 64 || smem_set[dev] < bytes)) {
      const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (e != cudaSuccess) return e;
      if (dev < 64) smem_set[dev] = bytes;
    }
    const dim3 grid(c, Nt), block(kThreads);
    if (c == 1) {
      kern<<<grid, block, bytes, s>>>(op, x, bias, out, M, static_cast<int>(x16));
      return cudaGetLastError();
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = static_cast<size_t>(bytes);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = c;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kern, op, x, bias, out, M, static_cast<int>(x16));
  };
  err = go(C);
  if (err == cudaSuccess || C == 1) return err == cudaSuccess ? cudaGetLastError() : err;
  (void)cudaGetLastError();  // the cluster did not launch: no split if x fits without one, else v1
  return c_fit == 1 ? go(1) : launch_fused_small_m(op, x, bias, out, M, s);
}

template <typename T, int BITS>
cudaError_t launch_bits(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s) {
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto op_ = static_cast<T*>(out);
  if (M == 1) return launch_mp<T, BITS, 1>(op, xp, bp, op_, M, s);
  if (M == 2) return launch_mp<T, BITS, 2>(op, xp, bp, op_, M, s);
  if (M <= 4) return launch_mp<T, BITS, 4>(op, xp, bp, op_, M, s);
  if (M <= 8) return launch_mp<T, BITS, 8>(op, xp, bp, op_, M, s);
  return launch_mp<T, BITS, 16>(op, xp, bp, op_, M, s);
}

template <typename T>
cudaError_t launch(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s) {
  return with_bits(op.bits, [&](auto b) { return launch_bits<T, decltype(b)::value>(op, x, bias, out, M, s); });
}

}  // namespace v3

// xt (K, LD) = x (M, K) transposed, columns M..LD-1 zero: thread c reads x's column c (coalesced across
// threads) and writes its LD values as 16-byte stores (LD * 2 bytes, 4-32).
template <typename T, int LD>
__global__ void transpose_x_kernel(const T* __restrict__ x, T* __restrict__ xt, int M, int K) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= K) return;
  __align__(16) T v[LD];
#pragma unroll
  for (int m = 0; m < LD; ++m) v[m] = m < M ? x[static_cast<size_t>(m) * K + c] : Num<T>::from(0.f);
  T* dst = xt + static_cast<size_t>(c) * LD;
  if constexpr (LD == 2) {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(v);
  } else if constexpr (LD == 4) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(v);
  } else {
#pragma unroll
    for (int i = 0; i < LD / 8; ++i) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(v)[i];
  }
}

template <typename T>
cudaError_t transpose_x(const void* x, void* xt, int M, int K, int ld, cudaStream_t s) {
  const dim3 block(128), grid((K + 127) / 128);
  auto xp = static_cast<const T*>(x);
  auto xtp = static_cast<T*>(xt);
  switch (ld) {
    case 2: transpose_x_kernel<T, 2><<<grid, block, 0, s>>>(xp, xtp, M, K); break;
    case 4: transpose_x_kernel<T, 4><<<grid, block, 0, s>>>(xp, xtp, M, K); break;
    case 8: transpose_x_kernel<T, 8><<<grid, block, 0, s>>>(xp, xtp, M, K); break;
    case 16: transpose_x_kernel<T, 16><<<grid, block, 0, s>>>(xp, xtp, M, K); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_transpose_x(const void* x, void* xt, int M, int K, int ld, bool bf16, cudaStream_t stream) {
  if (M < 1 || M > ld || K < 1) return cudaErrorInvalidValue;
  return bf16 ? transpose_x<__nv_bfloat16>(x, xt, M, K, ld, stream) : transpose_x<__half>(x, xt, M, K, ld, stream);
}

cudaError_t launch_fused_small_m(const Operands& op, const void* x, const void* bias, void* out, int M,
                                 cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? fused_dispatch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : fused_dispatch<__half>(op, x, bias, out, M, stream);
}

bool set_v1_table(const int (&table)[kV1Classes]) {
  // A class takes the configurations of its kernel (M <= 8 or M <= 16) that reach its largest M.
  constexpr int kClassMaxM[kV1Classes] = {4, 4, 8, 4, 8, 16};
  for (int c = 0; c < kV1Classes; ++c) {
    const int i = table[c];
    if (i < 0 || i >= kV1Cfgs || kV1CfgMaxM[i] < kClassMaxM[c] || (kV1CfgMaxM[i] == 16) != (kClassMaxM[c] == 16))
      return false;
  }
  std::copy(table, table + kV1Classes, g_v1_table);
  return true;
}

void get_v1_table(int (&table)[kV1Classes]) { std::copy(g_v1_table, g_v1_table + kV1Classes, table); }

cudaError_t launch_fused_small_m_cfg(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                     cudaStream_t stream) {
  if (M < 1 || op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? fused_cfg_dispatch<__nv_bfloat16>(op, x, bias, out, M, cfg, stream)
                 : fused_cfg_dispatch<__half>(op, x, bias, out, M, cfg, stream);
}

cudaError_t launch_fused_small_m_v2(const Operands& op, const void* x, const void* bias, void* out, int M,
                                    cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  // v2 copies the packed buffers with 16-byte cp.async: a misaligned view (never a fresh tensor)
  // takes the v1 kernel instead.
  const uintptr_t a = reinterpret_cast<uintptr_t>(op.qweight) | reinterpret_cast<uintptr_t>(op.scales) |
                      reinterpret_cast<uintptr_t>(op.zeros);
  if (a % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 4 != 0) return launch_fused_small_m(op, x, bias, out, M, stream);
  return op.bf16 ? v2::launch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : v2::launch<__half>(op, x, bias, out, M, stream);
}

cudaError_t launch_fused_small_m_v3(const Operands& op, const void* x, const void* bias, void* out, int M,
                                    cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  // M > 16 (reachable only by calling the binding directly) runs v1; v3 needs no alignment v1 does not.
  if (M > 16) return launch_fused_small_m(op, x, bias, out, M, stream);
  return op.bf16 ? v3::launch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : v3::launch<__half>(op, x, bias, out, M, stream);
}

cudaError_t launch_dequant_merge(const Operands& op, void* w, cudaStream_t stream) {
  if (op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? dequant_dispatch<__nv_bfloat16>(op, w, stream) : dequant_dispatch<__half>(op, w, stream);
}

}  // namespace libortho
