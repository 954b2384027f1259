// The large-M path (dequantize + merge into a bf16/fp16 weight for cuBLAS) and the transpose of x for v1's
// ortho stream.
#include "common.cuh"

namespace libortho {
namespace {

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
