// The large-M path (dequantize + merge into a bf16/fp16 weight for cuBLAS) and the transpose of x for v1's
// ortho stream.
#include "common.cuh"

namespace libortho {
namespace {

// Large-M path: W (N, K) = deq(Q) + alpha * S in the activation dtype, for cuBLAS. A block owns a strip of
// 16 rows and a range of K tiles; its 8 warps decode 8 consecutive 16x64 tiles into shared memory, add
// the ortho entries that fall in those 512 columns there, then write the tiles out in 16-byte stores, so
// W is written exactly once. The columns of a CSR row ascend (checked when a layer is packed or loaded),
// so each row keeps a cursor that only moves forward.
// With the ortho stream, a block first copies its rows' entries in its K range into shared memory (whole
// rows, in order, while they fit in kMergeCap; a row that does not fit reads its own from global memory):
// each chunk's merge then waits on no global load, where it used to wait on two dependent ones per row.
constexpr int kMergeCap = 2048;                        // staged entries per block (12 KB)

// The first entry in [lo, hi) of an ascending CSR row whose column is >= c (hi if none), found by the 16
// lanes of `t` in rounds of 16 probes: log16 of the row's length dependent loads rather than log2.
template <typename Half>
__device__ inline int first_col_at_least(const Half& t, const Operands& op, int lo, int hi, int c) {
  const int r = static_cast<int>(t.thread_rank());
  while (hi - lo > 16) {  // the answer lies in [lo, hi]
    const int step = (hi - lo + 15) >> 4, p = lo + r * step;
    const int below = __popc(t.ballot(p < hi && col_at(op, p) < c));  // probes below c: a prefix
    if (below == 0) return lo;
    const int next_lo = lo + (below - 1) * step + 1;
    hi = min(hi, lo + below * step);
    lo = next_lo;
  }
  return lo + __popc(t.ballot(lo + r < hi && col_at(op, lo + r) < c));
}

// Per row of the strip: its entries' range [beg, end) and cursor, indices into the staged arrays for the
// rows in the `staged` mask, into the CSR arrays otherwise.
template <typename T>
struct MergeRows {
  int beg[16], end[16], cur[16];
  int src[16], soff[16];  // a row's first CSR entry; its offset in the staged arrays (rows not staged: none)
  int staged, total;
  int col[kMergeCap];
  T val[kMergeCap];
};

// Finds each row's entries in [c_lo, c_hi) (a half warp per row) and stages them in shared memory.
template <typename T>
__device__ void stage_rows(MergeRows<T>& m, const Operands& op, int tn, int c_lo, int c_hi) {
  const auto half = cg::tiled_partition<16>(cg::this_thread_block());
  const int rr = threadIdx.x >> 4, n = tn * 16 + rr;
  if (rr < 16) {
    int lo = 0, hi = 0;
    if (n < op.N) {
      lo = op.row_ptr[n], hi = op.row_ptr[n + 1];
      if (c_lo > 0) lo = first_col_at_least(half, op, lo, hi, c_lo);
      if (c_hi < op.K) hi = first_col_at_least(half, op, lo, hi, c_hi);
    }
    if (half.thread_rank() == 0) m.src[rr] = lo, m.end[rr] = hi - lo;  // end: the count, for now
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int off = 0, staged = 0;
    for (int r = 0; r < 16; ++r) {
      const int cnt = m.end[r];
      const bool fits = off + cnt <= kMergeCap;
      m.soff[r] = off;
      m.beg[r] = fits ? off : m.src[r];
      m.end[r] = m.beg[r] + cnt, m.cur[r] = m.beg[r];
      if (fits) off += cnt, staged |= 1 << r;
    }
    m.staged = staged, m.total = off;
  }
  __syncthreads();
  const int total = m.total;
  constexpr int kBatch = 4;  // loads in flight per thread (8 would spill at 7 blocks per SM)
  for (int i0 = threadIdx.x; i0 < total; i0 += kBatch * kWarps * 32) {
    int c[kBatch];
    T v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {  // all of the batch's loads first
      const int i = i0 + j * kWarps * 32;
      if (i < total) {
        int r = 0;  // the last row whose staged part starts at or before i: the row holding entry i
#pragma unroll      // (empty rows and rows not staged take no room, so they share the next row's offset)
        for (int s = 8; s; s >>= 1)
          if (m.soff[r + s] <= i) r += s;
        const int e = m.src[r] + i - m.soff[r];
        c[j] = col_at(op, e), v[j] = static_cast<const T*>(op.values)[e];
      }
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j * kWarps * 32;
      if (i < total) m.col[i] = c[j], m.val[i] = v[j];
    }
  }
  __syncthreads();
}

template <typename T, int BITS, bool ORTHO>
__global__ void __launch_bounds__(kWarps * 32, ORTHO ? 7 : 0) dequant_merge_kernel(Operands op, T* __restrict__ wout,
                                                                    int tiles_per_block) {
  constexpr int kPitch = 64 + 8;  // keeps rows 16-byte aligned; pairs written by a warp hit 32 banks
  __shared__ __align__(16) T tile[kWarps][16][kPitch];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (K + op.group_size - 1) / op.group_size, Tk = (K + 63) >> 6;
  const int tn = blockIdx.y, kt_begin = blockIdx.x * tiles_per_block, kt_end = min(Tk, kt_begin + tiles_per_block);
  const bool vec = (K & 7) == 0;  // 16-byte stores need 8-element aligned rows
  const int32_t* qstrip = op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = op.zeros ? static_cast<const T*>(op.zeros) + static_cast<size_t>(tn) * G * 16 : nullptr;
  const float zdef = static_cast<float>(1 << (BITS - 1));
  uint32_t w[BITS];
  if (kt_begin + warp < kt_end) load_words<BITS>(w, qstrip + static_cast<size_t>(kt_begin + warp) * 32 * BITS);
  using Rows = std::conditional_t<ORTHO, MergeRows<T>, char>;
  __shared__ Rows rows;
  if constexpr (ORTHO) stage_rows(rows, op, tn, kt_begin * 64, min(K, kt_end * 64));
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
    if constexpr (ORTHO) {
      __syncthreads();
      const int c_hi = min(K, min(kt_end, base + kWarps) * 64);
      for (int rr = warp; rr < 16; rr += kWarps) {
        if (tn * 16 + rr >= N) break;
        const bool st = rows.staged >> rr & 1;
        const int end = rows.end[rr];
        int e0 = rows.cur[rr];
        while (e0 < end) {  // entries below c_hi form a prefix of what is left of the row
          const int e = e0 + lane;
          const int c = e >= end ? K : st ? rows.col[e] : col_at(op, e);
          const bool mine = c < c_hi;
          if (mine) {
            const T v = st ? rows.val[e] : static_cast<const T*>(op.values)[e];
            T& t = tile[(c >> 6) - base][rr][c & 63];
            t = Num<T>::from(Num<T>::f(t) + op.alpha * Num<T>::f(v));
          }
          const int taken = __popc(__ballot_sync(0xffffffffu, mine));
          e0 += taken;
          if (taken < 32) break;
        }
        if (lane == 0) rows.cur[rr] = e0;
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
cudaError_t dequant_dispatch(const Operands& op, void* w, cudaStream_t s) {
  // Whole rows per block when there are enough 16-row strips, else K split so ~512 blocks fill the SMs.
  const int Tk = (op.K + 63) / 64, strips = (op.N + 15) / 16;
  const int want = static_cast<int>((static_cast<int64_t>(Tk) * strips + 511) / 512);
  const int tpb = std::min(Tk, std::max(kWarps, (want + kWarps - 1) / kWarps * kWarps));
  const dim3 grid((Tk + tpb - 1) / tpb, strips), block(kWarps * 32);
  T* wp = static_cast<T*>(w);
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  return with_bits(op.bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if (ortho) dequant_merge_kernel<T, B, true><<<grid, block, 0, s>>>(op, wp, tpb);
    else dequant_merge_kernel<T, B, false><<<grid, block, 0, s>>>(op, wp, tpb);
    return cudaGetLastError();
  });
}

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

cudaError_t launch_dequant_merge(const Operands& op, void* w, cudaStream_t stream) {
  if (op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? dequant_dispatch<__nv_bfloat16>(op, w, stream) : dequant_dispatch<__half>(op, w, stream);
}

cudaError_t launch_transpose_x(const void* x, void* xt, int M, int K, int ld, bool bf16, cudaStream_t stream) {
  if (M < 1 || M > ld || K < 1) return cudaErrorInvalidValue;
  return bf16 ? transpose_x<__nv_bfloat16>(x, xt, M, K, ld, stream) : transpose_x<__half>(x, xt, M, K, ld, stream);
}

}  // namespace libortho
