// y (M, N) += alpha * x @ S^T for the CSR ortho stream S at M <= 64: the ortho half of a large-M GEMM call
// (gemm_sm90.cu writes y = x deq(Q)^T + bias, then this adds the stream in place). x arrives transposed,
// xt (K, LD) with LD = 32 or 64 (launch_transpose_x), so one entry's products for every token read one
// contiguous LD * 2-byte row instead of M values K apart. One warp per output row, one entry per lane, 32 tokens
// per pass over the row (two passes at LD = 64): a lane loads its entry's 32 xt values (4 16-byte loads, in flight
// together) and keeps 32 per-token sums; the warp then adds its lanes' sums by recursive halving (31 shuffles),
// which leaves lane l the total of token l of the pass. The next 32 entries load while these are summed. Sums
// meet in a fixed order: deterministic.
// (A first form, lanes over tokens and entries broadcast by shuffles, ran its loads one after another: ptxas
// interleaved them with the shuffles; 3-4 us per 32 entries on the H200.)
#include "common.cuh"

namespace libortho {
namespace {

// One step of the warp's recursive halving, then the next (W sums per lane, partner lane ^ O).
template <int W, int O>
__device__ inline void halve(float* acc, int lane) {
  const bool upper = lane & O;
#pragma unroll
  for (int i = 0; i < W / 2; ++i) {
    const float keep = upper ? acc[i + W / 2] : acc[i], give = upper ? acc[i] : acc[i + W / 2];
    acc[i] = keep + __shfl_xor_sync(~0u, give, O);
  }
  if constexpr (O > 1) halve<W / 2, O / 2>(acc, lane);
}

// The sums of one row for tokens t0 .. t0 + 31 (xt columns), one pass over the row's entries: lane l ends with
// token t0 + l's total.
template <typename T, int LD>
__device__ inline float row_half(const Operands& op, const T* __restrict__ xt, int b, int e, int t0, int lane) {
  const T* vals = static_cast<const T*>(op.values);
  float acc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) acc[i] = 0.f;
  int j = b + lane;
  int c = j < e ? col_at(op, j) : 0;
  float v = j < e ? Num<T>::f(vals[j]) : 0.f;
  for (; j - lane < e; j += 32) {
    const bool mine = j < e;
    const int jn = j + 32;  // the next entries load while these are summed
    const int cn = jn < e ? col_at(op, jn) : 0;
    const float vn = jn < e ? Num<T>::f(vals[jn]) : 0.f;
    if (mine) {
      uint4 w[4];
      const uint4* src = reinterpret_cast<const uint4*>(xt + static_cast<size_t>(c) * LD + t0);
#pragma unroll
      for (int q = 0; q < 4; ++q) w[q] = src[q];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t u[4] = {w[q].x, w[q].y, w[q].z, w[q].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          acc[8 * q + 2 * h] = fmaf(v, Num<T>::f(Num<T>::bits(u[h] & 0xFFFFu)), acc[8 * q + 2 * h]);
          acc[8 * q + 2 * h + 1] = fmaf(v, Num<T>::f(Num<T>::bits(u[h] >> 16)), acc[8 * q + 2 * h + 1]);
        }
      }
    }
    c = cn;
    v = vn;
  }
  // Recursive halving: at width w the lane keeps the half of its w sums its lane bit picks and adds its
  // partner's copy of that half; after five steps lane l holds token t0 + l.
  halve<32, 16>(acc, lane);
  return acc[0];
}

template <typename T, int LD>
__global__ void __launch_bounds__(256) ortho_add_kernel(Operands op, const T* __restrict__ xt, T* __restrict__ y,
                                                        int M) {
  const int lane = threadIdx.x & 31, row = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= op.N) return;  // whole warps
  constexpr int kHalves = LD / 32;  // passes over the row, 32 tokens each: lane l owns tokens l, 32 + l
  static_assert(kHalves == 1 || kHalves == 2, "LD is 32 or 64");
  float old[kHalves];  // this lane's outputs, read early (the GEMM wrote them: stream order)
#pragma unroll
  for (int h = 0; h < kHalves; ++h) {
    const int m = 32 * h + lane;
    old[h] = m < M ? Num<T>::f(y[static_cast<size_t>(m) * op.N + row]) : 0.f;
  }
  const int b = op.row_ptr[row], e = op.row_ptr[row + 1];
#pragma unroll 1
  for (int h = 0; h < kHalves; ++h) {  // one half at a time: 32 sums per lane (a 64-sum form held 98 registers)
    const float sum = row_half<T, LD>(op, xt, b, e, 32 * h, lane);
    const int m = 32 * h + lane;
    const float prev = h == 0 ? old[0] : old[kHalves - 1];  // constant indices: old stays in registers
    if (m < M) y[static_cast<size_t>(m) * op.N + row] = Num<T>::from(prev + op.alpha * sum);
  }
}

template <typename T>
cudaError_t ortho_add(const Operands& op, void* y, int M, cudaStream_t s) {
  const dim3 grid((op.N + 7) / 8), block(256);
  const T* xt = static_cast<const T*>(op.xt);
  if (op.xt_ld == 32) ortho_add_kernel<T, 32><<<grid, block, 0, s>>>(op, xt, static_cast<T*>(y), M);
  else ortho_add_kernel<T, 64><<<grid, block, 0, s>>>(op, xt, static_cast<T*>(y), M);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ortho_add(const Operands& op, void* y, int M, cudaStream_t stream) {
  if (!op.xt || (op.xt_ld != 32 && op.xt_ld != 64) || M < 1 || M > op.xt_ld) return cudaErrorInvalidValue;
  if (op.alpha == 0.f || op.nnz == 0) return cudaSuccess;  // nothing to add: no launch, no read
  return op.bf16 ? ortho_add<__nv_bfloat16>(op, y, M, stream) : ortho_add<__half>(op, y, M, stream);
}

}  // namespace libortho
