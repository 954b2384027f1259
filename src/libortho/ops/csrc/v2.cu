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
#include "common.cuh"

namespace libortho {
namespace {

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

}  // namespace

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

}  // namespace libortho
