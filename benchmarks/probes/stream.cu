// Read-only streaming kernels for benchmarks/probes/stream_probe.py: how fast can one kernel read B bytes
// that are not in L2, as a function of how the loads are issued? (No math: the bound LibOrtho's decode
// kernels are measured against.)
#include <cstdint>
#include <cuda_runtime.h>

namespace {

__device__ inline uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Each thread issues U 16-byte loads (block-strided, coalesced) before using any.
template <int U>
__global__ void stream_regs(const uint4* __restrict__ p, long n16, uint32_t* out) {
  const long base = static_cast<long>(blockIdx.x) * blockDim.x * U + threadIdx.x;
  uint4 v[U];
#pragma unroll
  for (int i = 0; i < U; ++i) {
    const long j = base + static_cast<long>(i) * blockDim.x;
    v[i] = j < n16 ? ld_stream(p + j) : make_uint4(0u, 0u, 0u, 0u);
  }
  uint32_t acc = 0u;
#pragma unroll
  for (int i = 0; i < U; ++i) acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // never (in practice): keeps the loads alive
}

__device__ inline uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// One thread copies the block's `chunk` bytes into shared memory with bulk copies of `piece` bytes
// (TMA, one mbarrier); then every thread reads them.
__global__ void stream_bulk(const char* __restrict__ p, long nbytes, int chunk, int piece, uint32_t* out) {
  extern __shared__ __align__(128) uint4 buf[];
  __shared__ __align__(8) uint64_t bar;
  const long off = static_cast<long>(blockIdx.x) * chunk;
  const int bytes = static_cast<int>(min(static_cast<long>(chunk), nbytes - off));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bar)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&bar)), "r"(bytes) : "memory");
    for (int o = 0; o < bytes; o += piece) {
      const int b = min(piece, bytes - o);
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(smem_u32(reinterpret_cast<char*>(buf) + o)), "l"(p + off + o), "r"(b), "r"(smem_u32(&bar))
                   : "memory");
    }
  }
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], 0; selp.u32 %0, 1, 0, q; }"
                 : "=r"(done) : "r"(smem_u32(&bar)) : "memory");
#endif
  uint32_t acc = 0u;
  for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) {
    const uint4 v = buf[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

}  // namespace

int launch_stream_regs(const void* p, long nbytes, int threads, int u, void* out, cudaStream_t s) {
  const long n16 = nbytes / 16, per = static_cast<long>(threads) * u;
  const int grid = static_cast<int>((n16 + per - 1) / per);
  auto o = static_cast<uint32_t*>(out);
  auto q = static_cast<const uint4*>(p);
  switch (u) {
    case 1: stream_regs<1><<<grid, threads, 0, s>>>(q, n16, o); break;
    case 2: stream_regs<2><<<grid, threads, 0, s>>>(q, n16, o); break;
    case 4: stream_regs<4><<<grid, threads, 0, s>>>(q, n16, o); break;
    case 8: stream_regs<8><<<grid, threads, 0, s>>>(q, n16, o); break;
    case 16: stream_regs<16><<<grid, threads, 0, s>>>(q, n16, o); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_stream_bulk(const void* p, long nbytes, int threads, int chunk, int piece, void* out, cudaStream_t s) {
  const int grid = static_cast<int>((nbytes + chunk - 1) / chunk);
  cudaError_t e = cudaFuncSetAttribute(stream_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, chunk);
  if (e != cudaSuccess) return static_cast<int>(e);
  stream_bulk<<<grid, threads, chunk, s>>>(static_cast<const char*>(p), nbytes, chunk, piece, static_cast<uint32_t*>(out));
  return static_cast<int>(cudaGetLastError());
}
