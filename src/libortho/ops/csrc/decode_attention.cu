// Decode attention: one query token per sequence against its KV cache (the step of a static-cache decode), split
// over the cache's positions (flash-decoding). Blocks of `chunk` positions each compute a partial softmax for the
// query heads that share one KV head (their max, sum and unnormalised weighted V, fp32, in a workspace); the last block
// of each (sequence, KV head) to finish combines them (one launch: at batch 1 a second kernel cost more than it saved).
// Positions the mask excludes for all those heads have no K or V read, so a static cache pays for the positions filled
// so far, not for its length (SDPA reads all of them).
// Semantics of torch's scaled_dot_product_attention with one query (scale, boolean or additive mask); a query whose
// positions are all excluded gives zeros, as SDPA does (torch 2.5 on).
#include <atomic>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"
#include "pdl.cuh"

namespace libortho {
namespace {

constexpr int kAttnWarps = 4;
constexpr int kAttnRows = 8;  // positions a warp takes per step: their K and V rows are all in flight at once
constexpr float kLog2e = 1.4426950408889634f;
// Tickets of the last-block combine: a block counts itself done on its (batch, KV head)'s ticket, and the last one
// combines the chunks and puts the ticket back to 0. Each call takes its own B * Hkv tickets from a ring (host side),
// so calls in flight at once (several streams, or graph nodes) do not share them.
constexpr int kAttnTickets = 1 << 19;
__device__ unsigned int g_attn_tickets[kAttnTickets];

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

// EPL = D / 32 elements of a row per lane: one 4- or 8-byte word, unpacked when used.
template <int EPL> using RowWord = typename std::conditional<EPL == 2, uint32_t, uint2>::type;

template <typename T, int EPL>
__device__ inline void unpack(const RowWord<EPL>& w, float (&out)[EPL]) {
  static_assert(EPL == 2 || EPL == 4, "head dims 64 and 128");
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < EPL; ++i) out[i] = to_float(e[i]);
}

template <typename T, int EPL>
__device__ inline RowWord<EPL> pack(const float (&in)[EPL]) {
  RowWord<EPL> w;
  T* e = reinterpret_cast<T*>(&w);
#pragma unroll
  for (int i = 0; i < EPL; ++i) e[i] = from_float<T>(in[i]);
  return w;
}

// transformers' rotary embedding of one row, EPL elements a lane (lane l: elements l EPL ..): x cos + rotate_half(x)
// sin, rotate_half(x) = (-x[D/2:], x[:D/2]); the partner half sits 16 lanes away. In fp32, rounded to T, as inductor
// computes the compiled model's rotary kernels. The whole warp calls it.
template <typename T, int EPL>
__device__ inline void rope_row(float (&x)[EPL], const T* cs, const T* sn, int lane) {
  float c[EPL], s[EPL], other[EPL];
  unpack<T, EPL>(*reinterpret_cast<const RowWord<EPL>*>(cs), c);
  unpack<T, EPL>(*reinterpret_cast<const RowWord<EPL>*>(sn), s);
#pragma unroll
  for (int i = 0; i < EPL; ++i) other[i] = __shfl_xor_sync(0xffffffffu, x[i], 16);
  const float sign = lane < 16 ? -1.f : 1.f;
#pragma unroll
  for (int i = 0; i < EPL; ++i) x[i] = to_float(from_float<T>(x[i] * c[i] + sign * other[i] * s[i]));
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The G heads h0.. of batch b: their chunks' parts combined and normalised, written to out (B, 1, Hq, D); zeros where
// no position took part. By the whole block (kAttnWarps warps), kCombineTile chunks at a time: the tile's (m, l) staged
// in shared memory, then each thread loads the tile's partial sums of its elements at once (independent loads, not one
// L2 round trip per chunk) and folds them into a running (max, sum, acc). The parts come from other blocks: read
// through L2 (__ldcg), never a stale L1 line.
constexpr int kCombineTile = 16;
template <typename T, int D, int G>
__device__ inline void combine_parts(const AttnArgs& a, int b, int h0) {
  constexpr int kThreads = kAttnWarps * 32, kPer = (G * D + kThreads - 1) / kThreads;
  __shared__ float sm_m[G][kCombineTile], sm_l[G][kCombineTile];
  const size_t row0 = (static_cast<size_t>(b) * a.Hq + h0) * a.splits;  // (b, h0, 0) in (B, Hq, splits)
  // Every block writes its part, zeros where no position took part, so the partial sums can be requested before
  // the tile's (m, l) arrive: one L2 round trip instead of two, where kPer x kCombineTile registers allow it.
  constexpr bool kEarly = kPer <= 2;
  float mx[kPer], lt[kPer], acc[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) mx[k] = -INFINITY, lt[k] = 0.f, acc[k] = 0.f;
  for (int s0 = 0; s0 < a.splits; s0 += kCombineTile) {
    float early[kEarly ? kPer : 1][kCombineTile];
    if constexpr (kEarly) {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int e = threadIdx.x + k * kThreads;
        if (kPer * kThreads != G * D && e >= G * D) break;
        const size_t r = row0 + static_cast<size_t>(e / D) * a.splits + s0;
#pragma unroll
        for (int j = 0; j < kCombineTile; ++j)
          early[k][j] = s0 + j < a.splits ? __ldcg(a.ws_acc + (r + j) * D + e % D) : 0.f;
      }
    }
    __syncthreads();  // the previous tile's (m, l) are no longer read
    for (int i = threadIdx.x; i < G * kCombineTile; i += kThreads) {
      const int g = i / kCombineTile, s = s0 + i % kCombineTile;
      const bool in = s < a.splits;
      const size_t r = row0 + static_cast<size_t>(g) * a.splits + s;
      sm_m[g][i % kCombineTile] = in ? __ldcg(a.ws_ml + 2 * r) : -INFINITY;
      sm_l[g][i % kCombineTile] = in ? __ldcg(a.ws_ml + 2 * r + 1) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int e = threadIdx.x + k * kThreads;
      if (kPer * kThreads != G * D && e >= G * D) break;
      const int g = e / D, d = e % D;
      const size_t r = row0 + static_cast<size_t>(g) * a.splits + s0;
      float part[kCombineTile];
#pragma unroll
      for (int j = 0; j < kCombineTile; ++j) {
        if constexpr (kEarly) part[j] = early[k][j];
        else part[j] = sm_m[g][j] != -INFINITY ? __ldcg(a.ws_acc + (r + j) * D + d) : 0.f;
      }
      float mt = mx[k];
#pragma unroll
      for (int j = 0; j < kCombineTile; ++j) mt = fmaxf(mt, sm_m[g][j]);
      if (mt == -INFINITY) continue;  // nothing of this head so far
      const float c = exp2f(mx[k] - mt);
      lt[k] *= c;
      acc[k] *= c;
#pragma unroll
      for (int j = 0; j < kCombineTile; ++j) {
        const float w = exp2f(sm_m[g][j] - mt);  // 0 for a chunk no position of which took part
        lt[k] += w * sm_l[g][j];
        acc[k] += w * part[j];
      }
      mx[k] = mt;
    }
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int e = threadIdx.x + k * kThreads;
    if (kPer * kThreads != G * D && e >= G * D) break;
    static_cast<T*>(a.out)[(static_cast<size_t>(b) * a.Hq + h0) * D + e] =
        from_float<T>(lt[k] > 0.f ? acc[k] / lt[k] : 0.f);
  }
}

// The K and V rows of positions pw + j for each j < kAttnRows that read(j) selects; zeros for the others.
template <typename T, int EPL, typename Read>
__device__ inline void load_kv_rows(const AttnArgs& a, const T* kb, const T* vb, int pw, Read read,
                                    RowWord<EPL> (&kr)[kAttnRows], RowWord<EPL> (&vr)[kAttnRows]) {
#pragma unroll
  for (int j = 0; j < kAttnRows; ++j) {
    kr[j] = vr[j] = RowWord<EPL>{};
    if (read(j)) {
      kr[j] = *reinterpret_cast<const RowWord<EPL>*>(kb + (pw + j) * a.k_sl);
      vr[j] = *reinterpret_cast<const RowWord<EPL>*>(vb + (pw + j) * a.v_sl);
    }
  }
}

// Block (chunk s, KV head hk, batch b): the G query heads of hk against positions [s * chunk, (s + 1) * chunk).
// Warp w takes kAttnRows consecutive positions at a time (w * kAttnRows on, stepping by the block's 4 * kAttnRows):
// lanes read the mask of those positions first, and only positions some head attends have their K and V rows read,
// so positions past the filled part of a static cache cost no K or V traffic. Softmax in the log2 domain, merged
// online over a warp's steps, then over the warps in shared memory. One chunk: the block writes out. Several: the
// block writes its part (m, l, acc[D]) per query head; with tickets the last block of its (b, hk) combines them,
// without (a.tickets null) decode_attention_combine does.
// kSpec (batch 1, where the launch waits on latency, not bytes): the K and V rows are requested together with the mask,
// not after it, saving a round trip for reading rows past the filled part; rows no head attends are zeroed after the
// ballot, so whatever such positions hold (NaN in an unwritten cache) never reaches the sums.
template <typename T, int D, int G, bool kSpec>
__global__ void __launch_bounds__(kAttnWarps * 32) decode_attention_split(AttnArgs a) {
  constexpr int EPL = D / 32;
  constexpr unsigned kAll = 0xffffffffu;
  const int s = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p0 = s * a.chunk, p1 = min(p0 + a.chunk, a.L);
  const int h0 = hk * G;
  const T* kb = static_cast<const T*>(a.k) + b * a.k_sb + hk * a.k_sh + lane * EPL;
  const T* vb = static_cast<const T*>(a.v) + b * a.v_sb + hk * a.v_sh + lane * EPL;
  if (a.pdl) {  // launched with PDL: nothing the kernels before write (q, K, V, the step form's rows) before the wait
    pdl_wait();
    if (!(a.pdl & kPdlLate)) pdl_trigger();
  }
  float q[G][EPL], m[G], l[G], acc[G][EPL];
  const bool step = a.kn != nullptr;
  const T* cs = step ? static_cast<const T*>(a.cos) + b * a.cs_sb + lane * EPL : nullptr;
  const T* sn = step ? static_cast<const T*>(a.sin) + b * a.cs_sb + lane * EPL : nullptr;
  const int64_t pos = step ? *a.pos : -1;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    unpack<T, EPL>(*reinterpret_cast<const RowWord<EPL>*>(static_cast<const T*>(a.q) + b * a.q_sb +
                                                         (h0 + g) * a.q_sh + lane * EPL), q[g]);
    if (step) rope_row<T, EPL>(q[g], cs, sn, lane);
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      q[g][i] *= a.scale * kLog2e;
      acc[g][i] = 0.f;
    }
  }
  for (int pw = p0 + warp * kAttnRows; pw < p1; pw += kAttnWarps * kAttnRows) {
    if (step && pos >= pw && pos < min(pw + kAttnRows, p1)) {
      // This warp's rows hold the new position: its key (rotated) and value rows go into the cache first; the loads
      // below read them back (each lane its own elements: a thread sees its own writes).
      float kf[EPL];
      unpack<T, EPL>(*reinterpret_cast<const RowWord<EPL>*>(static_cast<const T*>(a.kn) + b * a.kn_sb + hk * a.kn_sh +
                                                           lane * EPL), kf);
      rope_row<T, EPL>(kf, cs, sn, lane);
      *reinterpret_cast<RowWord<EPL>*>(const_cast<T*>(kb) + pos * a.k_sl) = pack<T, EPL>(kf);
      *reinterpret_cast<RowWord<EPL>*>(const_cast<T*>(vb) + pos * a.v_sl) =
          *reinterpret_cast<const RowWord<EPL>*>(static_cast<const T*>(a.vn) + b * a.vn_sb + hk * a.vn_sh + lane * EPL);
    }
    RowWord<EPL> kr[kAttnRows], vr[kAttnRows];
    if constexpr (kSpec) load_kv_rows<T, EPL>(a, kb, vb, pw, [&](int j) { return pw + j < p1; }, kr, vr);
    // Lane j < kAttnRows: the mask of position pw + j per head (-inf past the chunk).
    float mk[G];
    bool take = false;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      mk[g] = lane < kAttnRows && pw + lane < p1 && (!step || pw + lane <= pos) ? mask_at(a, b, h0 + g, pw + lane)
                                                                               : -INFINITY;
      take |= mk[g] != -INFINITY;
    }
    const unsigned taken = __ballot_sync(kAll, take);
    if (!taken) continue;
    if constexpr (kSpec) {
#pragma unroll
      for (int j = 0; j < kAttnRows; ++j)
        if (!(taken >> j & 1)) kr[j] = vr[j] = RowWord<EPL>{};
    } else {
      load_kv_rows<T, EPL>(a, kb, vb, pw, [&](int j) { return taken >> j & 1; }, kr, vr);
    }
    float sc[G][kAttnRows];
#pragma unroll
    for (int j = 0; j < kAttnRows; ++j) {
      float kf[EPL];
      unpack<T, EPL>(kr[j], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; ++i) dot += q[g][i] * kf[i];
        sc[g][j] = dot;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int j = 0; j < kAttnRows; ++j) {
        sc[g][j] = warp_sum(sc[g][j]) + __shfl_sync(kAll, mk[g], j);  // -inf: excluded (or a row not read)
        mx = fmaxf(mx, sc[g][j]);
      }
      if (mx == -INFINITY) continue;  // nothing of this head so far (uniform across the warp)
      const float c = exp2f(m[g] - mx);
      m[g] = mx;
      l[g] *= c;
#pragma unroll
      for (int i = 0; i < EPL; ++i) acc[g][i] *= c;
#pragma unroll
      for (int j = 0; j < kAttnRows; ++j) {
        sc[g][j] = exp2f(sc[g][j] - mx);
        l[g] += sc[g][j];
      }
    }
#pragma unroll
    for (int j = 0; j < kAttnRows; ++j) {
      float vf[EPL];
      unpack<T, EPL>(vr[j], vf);
#pragma unroll
      for (int g = 0; g < G; ++g)
        if (m[g] != -INFINITY)
#pragma unroll
          for (int i = 0; i < EPL; ++i) acc[g][i] += sc[g][j] * vf[i];
    }
  }
  // Merge the warps in shared memory; thread t then owns elements t, t + 128, ... of the G x D results.
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
  for (int e = threadIdx.x; e < G * D; e += kAttnWarps * 32) {
    const int g = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mx = fmaxf(mx, sm_ml[w][g][0]);
    float lt = 0.f, at = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) {
        const float mw = sm_ml[w][g][0];
        if (mw == -INFINITY) continue;  // a warp with no position taking part
        const float c = exp2f(mw - mx);
        lt += c * sm_ml[w][g][1];
        at += c * sm_acc[w][g][d];
      }
    }
    if (a.splits == 1) {
      static_cast<T*>(a.out)[(static_cast<size_t>(b) * a.Hq + h0 + g) * D + d] =
          from_float<T>(lt > 0.f ? at / lt : 0.f);
      continue;
    }
    const size_t row = (static_cast<size_t>(b) * a.Hq + h0 + g) * a.splits + s;
    if (d == 0) {
      a.ws_ml[2 * row] = mx;
      a.ws_ml[2 * row + 1] = lt;
    }
    a.ws_acc[row * D + d] = at;
  }
  if (a.pdl & kPdlLate) pdl_trigger();  // the dependents' launch overlaps the combine (or this block's exit)
  if (a.splits == 1 || a.tickets == nullptr) return;
  // Last block of (b, hk) combines: its parts are visible to the others before its ticket is (threadfence pattern).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  unsigned* ticket = a.tickets + b * a.Hkv + hk;
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == static_cast<unsigned>(a.splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  combine_parts<T, D, G>(a, b, h0);
  if (threadIdx.x == 0) *ticket = 0u;  // ready for the next call that takes this ticket
}

// Block (KV head hk, batch b): the parts of hk's G query heads combined (calls without tickets).
template <typename T, int D, int G>
__global__ void __launch_bounds__(kAttnWarps * 32) decode_attention_combine(AttnArgs a) {
  combine_parts<T, D, G>(a, blockIdx.y, blockIdx.x * G);
}

template <typename T, int D, int G>
cudaError_t launch_attn(const AttnArgs& a, cudaStream_t s) {
  const dim3 grid(a.splits, a.Hkv, a.B), block(kAttnWarps * 32);
  cudaError_t err = a.B == 1 ? launch_maybe_pdl(decode_attention_split<T, D, G, true>, grid, block, 0, s, a.pdl != 0, a)
                             : launch_maybe_pdl(decode_attention_split<T, D, G, false>, grid, block, 0, s, a.pdl != 0, a);
  if (err != cudaSuccess || a.splits == 1 || a.tickets != nullptr) return err;
  decode_attention_combine<T, D, G><<<dim3(a.Hkv, a.B), kAttnWarps * 32, 0, s>>>(a);
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

// B * Hkv tickets of the ring for one call (null where they do not fit: the combine kernel then runs).
static unsigned* take_tickets(int count) {
  static std::atomic<uint64_t> next{0};
  if (count > kAttnTickets) return nullptr;
  void* ring = nullptr;
  if (cudaGetSymbolAddress(&ring, g_attn_tickets) != cudaSuccess) return nullptr;
  uint64_t at = next.fetch_add(static_cast<uint64_t>(count)) % kAttnTickets;
  if (at + count > kAttnTickets) at = 0;
  return static_cast<unsigned*>(ring) + at;
}

cudaError_t launch_decode_attention(const AttnArgs& args, cudaStream_t stream) {
  if (!decode_attention_supported(args)) return cudaErrorInvalidValue;
  AttnArgs a = args;
  a.tickets = a.last_block_combines && a.splits > 1 ? take_tickets(a.B * a.Hkv) : nullptr;
  return a.bf16 ? launch_attn_t<__nv_bfloat16>(a, stream) : launch_attn_t<__half>(a, stream);
}

}  // namespace libortho
