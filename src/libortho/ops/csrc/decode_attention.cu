// Decode attention: one query token per sequence against its KV cache (the step of a static-cache decode), split
// over the cache's positions (flash-decoding). Blocks of `chunk` positions each compute a partial softmax for the
// query heads that share one KV head (their max, sum and unnormalised weighted V, fp32, in a workspace); a second
// kernel combines a head's chunks. A chunk whose positions the mask excludes for all those heads reads no K or V,
// so a static cache pays for the positions filled so far, not for its length (SDPA reads all of them).
// Semantics of torch's scaled_dot_product_attention with one query (scale, boolean or additive mask); a query whose
// positions are all excluded gives zeros, as SDPA does (torch 2.5 on).
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace libortho {
namespace {

constexpr int kAttnWarps = 4;
constexpr int kAttnUnroll = 4;  // positions whose K and V rows a warp loads before it uses the first
constexpr float kLog2e = 1.4426950408889634f;

__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ inline __half from_float(float v) { return __float2half_rn(v); }

// The mask's value at (batch b, query head h, position p) in the log2 domain: 0 or -inf (boolean: true attends), or
// the additive value times log2(e).
__device__ inline float mask_at(const AttnArgs& a, int b, int h, int p) {
  const int64_t i = b * a.m_sb + h * a.m_sh + p * a.m_sl;
  switch (a.mask_kind) {
    case kMaskBool: return static_cast<const bool*>(a.mask)[i] ? 0.f : -INFINITY;
    case kMaskF32: return static_cast<const float*>(a.mask)[i] * kLog2e;
    case kMaskBF16: return to_float(static_cast<const __nv_bfloat16*>(a.mask)[i]) * kLog2e;
    case kMaskF16: return to_float(static_cast<const __half*>(a.mask)[i]) * kLog2e;
    default: return 0.f;
  }
}

// EPL = D / 32 elements of a row per lane, one 4- or 8-byte load.
template <typename T, int EPL>
__device__ inline void load_row(const T* row, int lane, float (&out)[EPL]) {
  static_assert(EPL == 2 || EPL == 4, "head dims 64 and 128");
  using V = typename std::conditional<EPL == 2, uint32_t, uint2>::type;
  const V w = *reinterpret_cast<const V*>(row + lane * EPL);
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < EPL; ++i) out[i] = to_float(e[i]);
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block (chunk s, KV head hk, batch b): the G query heads of hk against positions [s * chunk, (s + 1) * chunk).
// Warp w takes positions w, w + 4, ... of the chunk, each lane EPL elements of every row; online softmax per warp
// (log2 domain), then the warps' parts are merged in shared memory and written as (m, l, acc[D]) per query head.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnWarps * 32)
decode_attention_split(AttnArgs a) {
  constexpr int EPL = D / 32;
  const int s = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p0 = s * a.chunk, p1 = min(p0 + a.chunk, a.L);
  const int h0 = hk * G;
  // Whether any position of the chunk takes part for any of the G heads (else no K or V is read).
  bool any = false;
  for (int p = p0 + threadIdx.x; p < p1; p += blockDim.x)
#pragma unroll
    for (int g = 0; g < G; ++g) any |= mask_at(a, b, h0 + g, p) != -INFINITY;
  const size_t ws_row = (static_cast<size_t>(b) * a.Hq + h0) * a.splits + s;  // (b, h0, s) in (B, Hq, splits)
  if (!__syncthreads_or(any)) {
    if (threadIdx.x < G) a.ws_ml[2 * (ws_row + static_cast<size_t>(threadIdx.x) * a.splits)] = -INFINITY;
    return;
  }
  float q[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_row(static_cast<const T*>(a.q) + b * a.q_sb + (h0 + g) * a.q_sh, lane, q[g]);
#pragma unroll
    for (int i = 0; i < EPL; ++i) q[g][i] *= a.scale * kLog2e;
  }
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh;
  float m[G], l[G], acc[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[g][i] = 0.f;
  }
  for (int pb = p0 + warp; pb < p1; pb += kAttnWarps * kAttnUnroll) {
    float kr[kAttnUnroll][EPL], vr[kAttnUnroll][EPL];
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int p = pb + u * kAttnWarps;
      if (p < p1) {
        load_row(kb + p * a.k_sl, lane, kr[u]);
        load_row(vb + p * a.v_sl, lane, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kAttnUnroll; ++u) {
      const int p = pb + u * kAttnWarps;
      if (p >= p1) break;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) dot += q[g][i] * kr[u][i];
        const float sc = warp_sum(dot) + mask_at(a, b, h0 + g, p);
        if (sc == -INFINITY) continue;  // excluded (uniform across the warp)
        const float mn = fmaxf(m[g], sc), c = exp2f(m[g] - mn), w = exp2f(sc - mn);
        m[g] = mn;
        l[g] = l[g] * c + w;
#pragma unroll
        for (int i = 0; i < EPL; ++i) acc[g][i] = acc[g][i] * c + w * vr[u][i];
      }
    }
  }
  // Merge the warps: each writes its (m, l) and acc, then warp 0 combines them.
  __shared__ float sm_ml[kAttnWarps][G][2];
  __shared__ float sm_acc[kAttnWarps][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      sm_ml[warp][g][0] = m[g];
      sm_ml[warp][g][1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) sm_acc[warp][g][lane * EPL + i] = acc[g][i];
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mx = fmaxf(mx, sm_ml[w][g][0]);
    float lt = 0.f, at[EPL] = {};
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) {
        const float mw = sm_ml[w][g][0];
        if (mw == -INFINITY) continue;  // a warp with no position taking part
        const float c = exp2f(mw - mx);
        lt += c * sm_ml[w][g][1];
#pragma unroll
        for (int i = 0; i < EPL; ++i) at[i] += c * sm_acc[w][g][lane * EPL + i];
      }
    }
    const size_t row = ws_row + static_cast<size_t>(g) * a.splits;
    if (lane == 0) {
      a.ws_ml[2 * row] = mx;
      a.ws_ml[2 * row + 1] = lt;
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) a.ws_acc[row * D + lane * EPL + i] = at[i];
  }
}

// Block (query head h, batch b), one thread per element of the head: the chunks' parts combined, normalised, written
// to out (B, 1, Hq, D); zeros where no position took part.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_attention_combine(AttnArgs a) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const size_t row0 = (static_cast<size_t>(b) * a.Hq + h) * a.splits;
  float mx = -INFINITY;
  for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, a.ws_ml[2 * (row0 + s)]);
  float l = 0.f, acc = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < a.splits; ++s) {
      const float ms = a.ws_ml[2 * (row0 + s)];
      if (ms == -INFINITY) continue;  // a skipped chunk: its l and acc were never written
      const float c = exp2f(ms - mx);
      l += c * a.ws_ml[2 * (row0 + s) + 1];
      acc += c * a.ws_acc[(row0 + s) * D + d];
    }
  }
  static_cast<T*>(a.out)[(static_cast<size_t>(b) * a.Hq + h) * D + d] = from_float<T>(l > 0.f ? acc / l : 0.f);
}

template <typename T, int D, int G>
cudaError_t launch_attn(const AttnArgs& a, cudaStream_t s) {
  decode_attention_split<T, D, G><<<dim3(a.splits, a.Hkv, a.B), kAttnWarps * 32, 0, s>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_attention_combine<T, D><<<dim3(a.Hq, a.B), D, 0, s>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_attn_d(const AttnArgs& a, cudaStream_t s) {
  switch (a.Hq / a.Hkv) {
    case 1: return launch_attn<T, D, 1>(a, s);
    case 2: return launch_attn<T, D, 2>(a, s);
    case 3: return launch_attn<T, D, 3>(a, s);
    case 4: return launch_attn<T, D, 4>(a, s);
    case 5: return launch_attn<T, D, 5>(a, s);
    case 6: return launch_attn<T, D, 6>(a, s);
    case 7: return launch_attn<T, D, 7>(a, s);
    case 8: return launch_attn<T, D, 8>(a, s);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_attn_t(const AttnArgs& a, cudaStream_t s) {
  return a.D == 64 ? launch_attn_d<T, 64>(a, s) : a.D == 128 ? launch_attn_d<T, 128>(a, s) : cudaErrorInvalidValue;
}

}  // namespace

bool decode_attention_supported(const AttnArgs& a) {
  return (a.D == 64 || a.D == 128) && a.Hkv > 0 && a.Hq % a.Hkv == 0 && a.Hq / a.Hkv <= kAttnMaxGroup && a.B > 0 &&
         a.L > 0 && a.chunk > 0 && a.splits == (a.L + a.chunk - 1) / a.chunk;
}

cudaError_t launch_decode_attention(const AttnArgs& a, cudaStream_t stream) {
  if (!decode_attention_supported(a)) return cudaErrorInvalidValue;
  return a.bf16 ? launch_attn_t<__nv_bfloat16>(a, stream) : launch_attn_t<__half>(a, stream);
}

}  // namespace libortho
