// Device helpers shared by every LibOrtho kernel (v1.cu, v1_configs.cu, v2.cu, v3.cu, dequant.cu): cp.async,
// mma, the packed-tile dequantizer and the group index. Layout of the packed base: see libortho/quant.py. In
// short, a warp reads one 16x64 tile as 32*BITS consecutive words; lane l's words hold exactly the A-operand
// fragments of four mma.m16n8k16 steps, so the weights go from one wide load to tensor-core registers with no
// shared-memory round trip. The activations are the B operand (the "swap AB" trick for small M).
// Everything here sits in an anonymous namespace: each translation unit gets its own copy.
#pragma once
#include <algorithm>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include "kernels.h"
#include "pdl.cuh"

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

struct DeviceInfo {
  int sms = 0;
  bool cc90 = false;  // compute capability 9.0 or above
  bool sm90a = false;  // exactly 9.0: what the wgmma kernels are built for (cuda.py's flags)
};

// SM count and sm_90 flag of the current device, cached per device.
inline DeviceInfo device_info() {
  static DeviceInfo cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return DeviceInfo{132, false};
  if (cache[dev].sms == 0) {
    int sms = 0, major = 0, minor = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cache[dev].cc90 = major >= 9;
    cache[dev].sm90a = major == 9 && minor == 0;
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

// The line holding p on its way to L2 (no register, no wait): for data a kernel reads only at its end.
__device__ inline void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

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
  // Host too: the launcher decides from the same conditions whether the ring takes a call (v1_lean_ok).
  __host__ __device__ GroupIndex(int group_size, int K_) : size(group_size), K(K_) {
    const bool one = group_size >= K_, pow2 = (group_size & (group_size - 1)) == 0;
    shift = one ? 31 : pow2 ? lowest_bit(group_size) : -1;
    same = one || group_size % 64 == 0;
  }
  __host__ __device__ static int lowest_bit(int v) {  // v > 0
#ifdef __CUDA_ARCH__
    return __ffs(v) - 1;
#else
    return v > 0 ? __builtin_ctz(static_cast<unsigned>(v)) : -1;
#endif
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
// warp's own kRows (16 or 32: the block's rows) of `stride` partial sums (red[warp]; the epilogue adds the warps up). Runs are
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

template <int MR, int kRows = 16, typename T, class ColAt, class ValAt>
__device__ inline void ortho_run(float* out, int stride, const int* rp, int run_b, int run_e, const T* x, int K,
                                 int M, float alpha, ColAt col_at, ValAt val_at, const T* xt = nullptr) {
  constexpr bool kScan = MR <= 16;
  static_assert(kRows == 16 || kRows == 32, "the row search halves a power-of-two row count");
  float part[MR], first[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) part[m] = first[m] = 0.f;
  // The run's first row: the last i < kRows with rp[i] <= run_b (row pointers never decrease), by halving
  // (4-5 shared loads; counting over all rows took ~4 instructions per row, ncu at 32 rows: 2026-11-29).
  int row = 0;
#pragma unroll
  for (int step = kRows / 2; step > 0; step >>= 1)
    if (rp[row + step] <= run_b) row += step;
  const int row0 = row;
  int next_rp = rp[row + 1];  // where the current row ends (a register: no shared load per entry)
  // Before entry e: add up the partial sums of the rows e has moved past.
  auto flush = [&](int e) {
    if (e < next_rp) return;
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
    while (e >= next_rp) next_rp = rp[++row + 1];
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
  int key = run_b < run_e ? row : kRows;                      // row of the last partial (kRows: empty run)
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
  if (key < kRows && (lane == 31 || next != key))
#pragma unroll
    for (int m = 0; m < MR; ++m)
      if (m < M) out[key * stride + m] += alpha * part[m];
}

// Column of CSR entry e (int16 or int32 column indices).
__device__ inline int col_at(const Operands& op, int e) {
  return op.col16 ? static_cast<int>(static_cast<const int16_t*>(op.col_idx)[e]) : static_cast<const int32_t*>(op.col_idx)[e];
}

}  // namespace
}  // namespace libortho
