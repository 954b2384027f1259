// The large-M path (dequantize + merge into a bf16/fp16 weight for cuBLAS) and the transpose of x for v1's
// ortho stream.
#include "common.cuh"

namespace libortho {
namespace {

// Large-M path: W (N, K) = deq(Q) + alpha * S in the activation dtype, for cuBLAS. A block owns a strip of
// 16 rows and a range of K tiles; its 8 warps decode 8 consecutive 16x64 tiles into shared memory, add
// the ortho entries that fall in those 512 columns there, then write the tiles out in 16-byte stores, so
// W is written exactly once. The columns of a CSR row ascend (checked when a layer is packed or loaded).
// Warp w merges rows w and w + 8 of the strip. Under the weight stream a global load takes microseconds,
// and the grid is about one wave, so every load a block waits on adds to the kernel's time: per row the
// warp holds a window of the 32 entries from its cursor (lane l: entry cursor + l), and the entries a
// merge consumed are replaced right after it, so their loads are in flight during the next chunk's
// dequantization. alpha == 0 runs the kernel without any of this (ORTHO false).

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

// One row's window of entries: this lane's entry of the row (column K past the row's end) and its cursor.
struct MergeWindow {
  int cur = 0, end = 0, col = 0;
  uint32_t val = 0;  // the value's bits

  __device__ void load(const Operands& op, int lane) {
    const int e = cur + lane;
    col = e < end ? col_at(op, e) : op.K;
    val = e < end ? static_cast<const uint16_t*>(op.values)[e] : 0u;
  }
  // Adds the window's entries below column c_hi to the chunk of tiles that starts at column c0, then
  // moves past them.
  template <typename T, typename Tile>
  __device__ void merge(const Operands& op, Tile& tile, int rr, int c0, int c_hi, int lane) {
    for (;;) {
      const bool mine = col < c_hi;  // a prefix of the lanes: the columns ascend
      if (mine) {
        T& t = tile[(col - c0) >> 6][rr][col & 63];
        t = Num<T>::from(Num<T>::f(t) + op.alpha * Num<T>::f(Num<T>::bits(val)));
      }
      const int taken = __popc(__ballot_sync(0xffffffffu, mine));
      cur += taken;
      if (taken < 32) {  // slide by `taken`; the last `taken` lanes load the entries after the window
        const int c2 = __shfl_down_sync(0xffffffffu, col, taken);
        const uint32_t v2 = __shfl_down_sync(0xffffffffu, val, taken);
        if (lane + taken < 32) col = c2, val = v2;
        else load(op, lane);
        return;
      }
      load(op, lane);  // 32 or more entries of the row in this chunk: the next 32, waited on here
    }
  }
};

// With the merge, 6 blocks per SM (40 registers): a 11008-row W's 688 blocks stay in one wave of 792 (8 per
// SM without it). Larger grids take MINB = 7 (32 registers, a few spills) rather than a second wave.
template <typename T, int BITS, bool ORTHO, int MINB = 6>
__global__ void __launch_bounds__(kWarps * 32, ORTHO ? MINB : 0) dequant_merge_kernel(Operands op, T* __restrict__ wout,
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
  static_assert(kWarps == 8, "the merge gives each warp two of the strip's 16 rows");
  MergeWindow win[2];  // rows warp and warp + 8
  if constexpr (ORTHO) {
    const auto half = cg::tiled_partition<16>(cg::this_thread_block());
    const int n = tn * 16 + warp + 8 * (lane >> 4);
    int lo = 0, hi = 0;
    if (n < N) {
      lo = op.row_ptr[n], hi = op.row_ptr[n + 1];
      if (kt_begin > 0) lo = first_col_at_least(half, op, lo, hi, kt_begin * 64);
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      win[q].cur = __shfl_sync(0xffffffffu, lo, 16 * q), win[q].end = __shfl_sync(0xffffffffu, hi, 16 * q);
      win[q].load(op, lane);
    }
  }
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
#pragma unroll
      for (int q = 0; q < 2; ++q)
        if (tn * 16 + warp + 8 * q < N) win[q].template merge<T>(op, tile, warp + 8 * q, base * 64, c_hi, lane);
      __syncthreads();
    }
    if (kt < kt_end) {
      if constexpr (!ORTHO) __syncwarp();  // the tile's values come from all lanes (the merge's barrier does it there)
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
  // With the merge: whole rows per block when there are enough 16-row strips, else K split so ~512 blocks fill
  // the SMs (a block's merge starts with a search of its rows, so fewer, longer blocks). Without it: one round
  // of 8 tiles per block, many short blocks that the block scheduler spreads evenly; ~one wave of whole rows
  // left SMs with one block more than others (H200, M = 512: 3.5-5.5 % faster in a same-machine A/B; a
  // persistent grid of warps taking tiles round-robin gained only 1-2 %; benchmarks/NOTES-kernels.md).
  const int Tk = (op.K + 63) / 64, strips = (op.N + 15) / 16;
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  const int want = static_cast<int>((static_cast<int64_t>(Tk) * strips + 511) / 512);
  const int tpb = std::min(Tk, ortho ? std::max(kWarps, (want + kWarps - 1) / kWarps * kWarps) : kWarps);
  const dim3 grid((Tk + tpb - 1) / tpb, strips), block(kWarps * 32);
  T* wp = static_cast<T*>(w);
  const bool wide = static_cast<int64_t>(grid.x) * grid.y > 6 * device_info().sms;
  return with_bits(op.bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if (ortho && wide) dequant_merge_kernel<T, B, true, 7><<<grid, block, 0, s>>>(op, wp, tpb);
    else if (ortho) dequant_merge_kernel<T, B, true><<<grid, block, 0, s>>>(op, wp, tpb);
    else dequant_merge_kernel<T, B, false><<<grid, block, 0, s>>>(op, wp, tpb);
    return cudaGetLastError();
  });
}

// xt (K, LD) = x (M, K) transposed, columns M..LD-1 zero: thread c reads x's column c (coalesced across
// threads) and writes its LD values as 16-byte stores (LD * 2 bytes, 4-128).
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
    case 32: transpose_x_kernel<T, 32><<<grid, block, 0, s>>>(xp, xtp, M, K); break;  // the GEMM's ortho add
    case 64: transpose_x_kernel<T, 64><<<grid, block, 0, s>>>(xp, xtp, M, K); break;
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
