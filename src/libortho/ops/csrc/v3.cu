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
#include "common.cuh"

namespace libortho {
namespace {

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

}  // namespace

cudaError_t launch_fused_small_m_v3(const Operands& op, const void* x, const void* bias, void* out, int M,
                                    cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  // M > 16 (reachable only by calling the binding directly) runs v1; v3 needs no alignment v1 does not.
  if (M > 16) return launch_fused_small_m(op, x, bias, out, M, stream);
  return op.bf16 ? v3::launch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : v3::launch<__half>(op, x, bias, out, M, stream);
}

}  // namespace libortho
