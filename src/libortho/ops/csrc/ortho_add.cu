// y (M, N) += alpha * x @ S^T for the CSR ortho stream S at M <= 64: the ortho half of a large-M GEMM call
// (gemm_sm90.cu writes y = x deq(Q)^T + bias, then this adds the stream in place). x arrives transposed,
// xt (K, LD) with LD = 32 or 64 (launch_transpose_x), so one entry's products for every token read one
// contiguous LD * 2-byte row instead of M values K apart. One warp per output row: its lanes load 32 entries
// at once (coalesced; the next 32 load while these are summed), then each group of LD / 2 lanes (two tokens a
// lane) takes one entry per step, the 64 / LD groups different entries, all 32 entries' x loads in flight
// together (a first form with the loads under `if (entry valid)` ran them one after another: 2.4 us per 32
// entries, H200). Sums meet in a fixed order: deterministic.
#include "common.cuh"

namespace libortho {
namespace {

__device__ inline float2 f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ inline float2 f2(__half2 v) { return __half22float2(v); }

// Entry s (0..31) of the chunk held one per lane: its column and value, broadcast (s < cnt), else column 0 and no
// value (the load stays unconditional, so all of a chunk's loads are in flight together).
template <typename T, int LD>
__global__ void __launch_bounds__(256) ortho_add_kernel(Operands op, const T* __restrict__ xt, T* __restrict__ y,
                                                        int M) {
  constexpr int P = LD / 2, E = 32 / P;  // lanes per entry, entries per step
  using T2 = typename Num<T>::T2;
  const int lane = threadIdx.x & 31, row = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (row >= op.N) return;  // whole warps
  const int grp = lane / P, pair = lane % P, m = 2 * pair;
  // this lane's two outputs, read early (the GEMM wrote them: stream order) to hide the read behind the sums
  T* y0 = y + static_cast<size_t>(m) * op.N + row;
  const bool own0 = grp == 0 && m < M, own1 = grp == 0 && m + 1 < M;
  const float old0 = own0 ? Num<T>::f(*y0) : 0.f, old1 = own1 ? Num<T>::f(y0[op.N]) : 0.f;
  const int b = op.row_ptr[row], e = op.row_ptr[row + 1];
  const T* vals = static_cast<const T*>(op.values);
  const T2* xrow = reinterpret_cast<const T2*>(xt) + pair;
  int c = b + lane < e ? col_at(op, b + lane) : 0;
  float v = b + lane < e ? Num<T>::f(vals[b + lane]) : 0.f;
  float a0 = 0.f, a1 = 0.f;
  for (int j0 = b; j0 < e; j0 += 32) {
    const int cnt = min(32, e - j0), jn = j0 + 32 + lane;  // the next chunk's entries load during this one
    const int cn = jn < e ? col_at(op, jn) : 0;
    const float vn = jn < e ? Num<T>::f(vals[jn]) : 0.f;
    float2 xv[P];
#pragma unroll
    for (int t = 0; t < P; ++t) xv[t] = f2(xrow[static_cast<size_t>(__shfl_sync(~0u, c, t * E + grp)) * P]);
#pragma unroll
    for (int t = 0; t < P; ++t) {
      const int s = t * E + grp;
      const float vs = __shfl_sync(~0u, v, s);
      if (s < cnt) {  // a select: x may hold inf, and 0 * inf must not reach the sum
        a0 = fmaf(vs, xv[t].x, a0);
        a1 = fmaf(vs, xv[t].y, a1);
      }
    }
    c = cn;
    v = vn;
  }
#pragma unroll
  for (int o = P; o < 32; o <<= 1) {  // the groups' partial sums of one token pair
    a0 += __shfl_xor_sync(~0u, a0, o);
    a1 += __shfl_xor_sync(~0u, a1, o);
  }
  if (own0) *y0 = Num<T>::from(old0 + op.alpha * a0);
  if (own1) y0[op.N] = Num<T>::from(old1 + op.alpha * a1);
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
