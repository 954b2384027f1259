// Programmatic dependent launch helpers, shared by the decode kernels (common.cuh) and decode attention.
#pragma once
#include <utility>

#include <cuda_runtime.h>

#include "kernels.h"

namespace libortho {
namespace {

// Programmatic dependent launch (Hopper; $LIBORTHO_PDL, "first" for one-row calls by default; kPdl* bits in kernels.h).
// A kernel launched with it may start while the previous kernel in the stream drains: before griddepcontrol.wait it
// reads nothing that kernel writes (v1 only issues L2 prefetches of its own weight strip, hints whose values are never
// used, unless kPdlNoPrefetch; with kPdlFirstTiles only the first `first` bytes of each of its `segs` row-tile
// segments: the tiles its ring requests first, whose HBM latency then overlaps the kernel before instead of its whole
// strip competing with that kernel's stream), so results cannot depend on the overlap. Its own dependents may launch
// once every block has triggered (or exited): right after the wait, or with kPdlLate after the block's main loop, so
// that a dependent's blocks, which hold their SM slots while they wait, do not crowd out this kernel's later waves.
// Without PDL, or before sm_90, the instructions are no-ops.
__device__ inline void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ inline void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ inline void pdl_prologue(int mode, const void* strip, int seg_bytes, int segs, int first) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (!(mode & kPdlNoPrefetch)) {
    const int n = mode & kPdlFirstTiles ? min(first, seg_bytes) : seg_bytes * segs;
    const int step = mode & kPdlFirstTiles ? seg_bytes : n;  // segment starts (one segment when the whole strip)
    for (int s = 0; s * step < seg_bytes * segs; ++s) {
      const char* p = static_cast<const char*>(strip) + static_cast<size_t>(s) * step;
      for (int off = threadIdx.x * 128; off < n; off += blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
    }
  }
#endif
  pdl_wait();
  if (!(mode & kPdlLate)) pdl_trigger();
}

// cudaLaunchKernelEx with the programmatic-serialization attribute when `pdl` is set, else a plain launch.
template <typename... P, typename... A>
cudaError_t launch_maybe_pdl(void (*kernel)(P...), dim3 grid, dim3 block, int smem, cudaStream_t s, bool pdl,
                             A&&... args) {
  if (!pdl) {
    kernel<<<grid, block, smem, s>>>(std::forward<A>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = s;
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

}  // namespace
}  // namespace libortho
