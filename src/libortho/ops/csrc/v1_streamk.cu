// Stream-K form of the v1 ring for tall grids without the ortho stream (alpha == 0 or no entries), M <= 8.
//
// Why: at K = 4096 a block of the ring kernel streams 8 tiles per warp and then pays its start, the wait
// for its first tiles from HBM and the barrier before its reduction again (about 30 % of the stall samples
// on 11008x4096, README "What this leaves for the goals"), and 344 blocks of 32 rows run on 264 slots in
// 1.3 waves. Here a grid of resident blocks takes equal shares of all (row strip, 512-column group) units
// in strip-major order, so each block pays its start once and no SM idles in a last partial wave.
//
// A strip whose units two or more blocks share is finished by whichever block arrives last (a counter per
// strip): every part's fp32 sums go to a workspace slot of its block, and the last one adds the parts in
// block order, so the result does not depend on the order of arrival. The last one also resets the
// counter for the next call. The workspace belongs to the device (one call at a time per device: two
// streams running this path at once would share the counters).
#include "v1.cuh"

namespace libortho {
namespace {

// Units are (strip, group) pairs, strip-major; a group is kWarps tiles (one per warp) of one strip.
struct StreamK {
  int strips, groups, units, blocks;
  __host__ __device__ int start(int b) const { return static_cast<int>(static_cast<int64_t>(b) * units / blocks); }
  __host__ __device__ int block_of(int u) const {
    int b = static_cast<int>(static_cast<int64_t>(u) * blocks / units);
    while (b + 1 < blocks && start(b + 1) <= u) ++b;
    while (b > 0 && start(b) > u) --b;
    return b;
  }
  // the workspace slot of block b's part of strip s: 0 for the strip its range starts in, 1 otherwise
  __host__ __device__ int slot(int b, int s) const { return start(b) / groups == s ? 0 : 1; }
};

template <typename T, int NT, class Cfg>
__global__ void __launch_bounds__(kWarps * 32, Cfg::kMinBlocks)
streamk_kernel(Operands op, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out, int M,
               StreamK sk, float* __restrict__ ws, int* __restrict__ counters) {
  constexpr int MT = NT * 8, RT = Cfg::kRowTiles, R = 16 * RT, S = Cfg::kStages, XR = Cfg::kXRows;
  static_assert(S > 0 && XR > 0 && Cfg::kPrefetchX, "the stream-K form runs the ring with x in it");
  __shared__ float red[kWarps][R][MT + 1];
  __shared__ int last;
  using WSlots = uint4[S][RT * 32];
  using PSlots = uint32_t[S][RT * 16];
  using XSlots = uint4[S][XR * 8];
  WSlots* wring;
  PSlots* pring;
  XSlots* xring;
  if constexpr (Cfg::kDynRing) {
    extern __shared__ __align__(16) uint4 v1_ring[];
    xring = reinterpret_cast<XSlots*>(v1_ring);
    wring = reinterpret_cast<WSlots*>(v1_ring + kWarps * S * XR * 8);
    pring = reinterpret_cast<PSlots*>(v1_ring + kWarps * S * (XR * 8 + RT * 32));
  } else {
    __shared__ __align__(16) uint4 wring_s[kWarps][S][RT * 32];
    __shared__ __align__(16) uint32_t pring_s[kWarps][S][RT * 16];
    __shared__ __align__(16) uint4 xring_s[kWarps][S][XR * 8];
    wring = wring_s;
    pring = pring_s;
    xring = xring_s;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (K + op.group_size - 1) / op.group_size, Tk = K >> 6;
  const GroupIndex gi(op.group_size, K);
  const int pstep = ring_pstep(gi);
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(x) + tig;  // unused with x in the ring
  int xo[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) xo[t] = 0;
  const int b = blockIdx.x, u_end = sk.start(b + 1);
  for (int u = sk.start(b); u < u_end;) {
    const int s = u / sk.groups, g0 = u % sk.groups, g1 = min(sk.groups, g0 + (u_end - u));
    u += g1 - g0;
    // The part: row tiles s * RT.., K tiles 8 g0 .. min(8 g1, Tk) - 1; this warp's are 8 g0 + warp, + 8, ...
    const int tn = s * RT, rts = min(RT, (N + 15) / 16 - tn);
    const size_t rt_q = rts > 1 ? static_cast<size_t>(Tk) * 32 * 4 : 0, rt_p = rts > 1 ? static_cast<size_t>(G) * 16 : 0;
    const int t0 = g0 * kWarps + warp, t1 = min(g1 * kWarps, Tk);
    const int nt = t1 > t0 ? (t1 - t0 + kWarps - 1) / kWarps : 0;
    const int32_t* qtile = op.qweight + (static_cast<size_t>(tn) * Tk + g0 * kWarps) * 32 * 4 + lane * 4;
    const size_t p0 = static_cast<size_t>(tn) * G * 16 + gi.of(g0 * kWarps * 64) * 16;
    const T* sc = static_cast<const T*>(op.scales) + p0;
    const T* zp = op.zeros ? static_cast<const T*>(op.zeros) + p0 : nullptr;
    float acc[RT][NT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[rt][t][0] = acc[rt][t][1] = acc[rt][t][2] = acc[rt][t][3] = 0.f;
    ring_sweep<S, XR, T, NT, true, RT>(acc, wring[warp], pring[warp], xring[warp], nt, warp, lane, qtile, rt_q, sc,
                                       zp, rt_p, xb, xo, x + g0 * kWarps * 64, M, K, gi, pstep, g, tig, [] {});
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        red[warp][rt * 16 + g][t * 8 + 2 * tig] = acc[rt][t][0];
        red[warp][rt * 16 + g][t * 8 + 2 * tig + 1] = acc[rt][t][1];
        red[warp][rt * 16 + g + 8][t * 8 + 2 * tig] = acc[rt][t][2];
        red[warp][rt * 16 + g + 8][t * 8 + 2 * tig + 1] = acc[rt][t][3];
      }
    }
    __syncthreads();
    const bool whole = g0 == 0 && g1 == sk.groups;
    float* mine = ws + (static_cast<size_t>(b) * 2 + sk.slot(b, s)) * R * MT;
    for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
      const int r = i % R, m = i / R, n = s * R + r;
      float y = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) y += red[w][r][m];
      if (!whole) {
        mine[i] = y;
      } else if (n < N) {
        out[static_cast<size_t>(m) * N + n] = Num<T>::from(bias ? y + Num<T>::f(bias[n]) : y);
      }
    }
    if (!whole) {
      __threadfence();  // this part's sums are visible before its arrival is counted
      __syncthreads();
      const int bf = sk.block_of(s * sk.groups), bl = sk.block_of((s + 1) * sk.groups - 1);
      if (threadIdx.x == 0) {
        last = atomicAdd(&counters[s], 1) == bl - bf;
        if (last) counters[s] = 0;  // every part has arrived: ready for the next call
      }
      __syncthreads();
      if (last) {
        __threadfence();
        for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
          const int r = i % R, m = i / R, n = s * R + r;
          float y = 0.f;
          for (int pb = bf; pb <= bl; ++pb) y += __ldcg(ws + (static_cast<size_t>(pb) * 2 + sk.slot(pb, s)) * R * MT + i);
          if (n < N) out[static_cast<size_t>(m) * N + n] = Num<T>::from(bias ? y + Num<T>::f(bias[n]) : y);
        }
      }
    }
    __syncthreads();  // red and `last` are reused by the next part
  }
}

// Per device: two slots of R * MT fp32 sums per block, one counter per strip (zero between calls: each is
// reset by the block that finishes its strip; kept apart from the sums, which any call overwrites), and
// whether the kernel's dynamic shared memory was allowed.
struct Workspace {
  float* sums = nullptr;
  int* counters = nullptr;
  size_t sum_bytes = 0, counter_bytes = 0;
  bool allowed = false;
};

// Grows one of the workspace's buffers to `need` bytes (zeroed): outside graph capture only, so a captured
// call finds it large enough (an earlier eager call of the same shape) or keeps the regular kernel.
template <typename P>
cudaError_t grow(P*& ptr, size_t& bytes, size_t need, cudaStream_t s, bool& ok) {
  ok = need <= bytes;
  if (ok) return cudaSuccess;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(s, &cap);
  if (err != cudaSuccess || cap != cudaStreamCaptureStatusNone) return err;
  err = cudaStreamSynchronize(s);  // the old buffer may still be in use
  if (err == cudaSuccess && ptr) err = cudaFree(ptr);
  ptr = nullptr;
  bytes = 0;
  void* p = nullptr;
  if (err == cudaSuccess) err = cudaMalloc(&p, need);
  if (err == cudaSuccess) err = cudaMemset(p, 0, need);
  if (err != cudaSuccess) return err;
  ptr = static_cast<P*>(p);
  bytes = need;
  ok = true;
  return cudaSuccess;
}

template <typename T, int NT, class Cfg>
cudaError_t launch_streamk(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s,
                           bool& used) {
  constexpr auto kernel = streamk_kernel<T, NT, Cfg>;
  constexpr int R = 16 * Cfg::kRowTiles, MT = NT * 8;
  static Workspace spaces[64];
  used = false;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess || dev < 0 || dev >= 64 || M > Cfg::kXRows || !v1_lean_ok<Cfg>(op, x, M)) return err;
  Workspace& w = spaces[dev];
  if (!w.allowed && Cfg::kRingBytes > 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kRingBytes);
    if (err != cudaSuccess) return err;
  }
  w.allowed = true;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, Cfg::kRingBytes);
  if (err != cudaSuccess) return err;
  StreamK sk{};
  sk.strips = (op.N + R - 1) / R;
  sk.groups = (op.K / 64 + kWarps - 1) / kWarps;
  sk.units = sk.strips * sk.groups;
  sk.blocks = std::max(1, std::min(sk.units, per_sm * device_info().sms));
  bool ok = false;
  err = grow(w.sums, w.sum_bytes, static_cast<size_t>(sk.blocks) * 2 * R * MT * sizeof(float), s, ok);
  if (err != cudaSuccess || !ok) return err;
  err = grow(w.counters, w.counter_bytes, static_cast<size_t>(sk.strips) * sizeof(int), s, ok);
  if (err != cudaSuccess || !ok) return err;
  kernel<<<sk.blocks, kWarps * 32, Cfg::kRingBytes, s>>>(op, static_cast<const T*>(x), static_cast<const T*>(bias),
                                                         static_cast<T*>(out), M, sk, w.sums, w.counters);
  used = true;
  return cudaGetLastError();
}

bool g_v1_streamk = false;  // off until run on a GPU
int64_t g_streamk_launches = 0;  // for the tests: the path really ran

}  // namespace

void set_v1_streamk(bool on) { g_v1_streamk = on; }
bool v1_streamk() { return g_v1_streamk; }
int64_t v1_streamk_launches() { return g_streamk_launches; }

cudaError_t launch_v1_streamk(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t s,
                              bool& used) {
  // configuration 11's ring (32 rows, x's 8 rows through it); without the ortho stream only
  using Cfg = V1Cfg<1, true, 2, 4, 8, 2>;
  used = false;
  if (!g_v1_streamk || op.bits != 4 || M > 8 || (op.alpha != 0.f && op.nnz > 0)) return cudaSuccess;
  const cudaError_t err = op.bf16 ? launch_streamk<__nv_bfloat16, 1, Cfg>(op, x, bias, out, M, s, used)
                                  : launch_streamk<__half, 1, Cfg>(op, x, bias, out, M, s, used);
  g_streamk_launches += used;
  return err;
}

}  // namespace libortho
