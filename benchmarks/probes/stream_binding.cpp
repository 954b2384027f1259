#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

int launch_stream_regs(const void* p, long nbytes, int threads, int u, void* out, cudaStream_t s);
int launch_stream_bulk(const void* p, long nbytes, int threads, int chunk, int piece, void* out, cudaStream_t s);

int64_t regs(const at::Tensor& buf, int64_t threads, int64_t u, const at::Tensor& out) {
  return launch_stream_regs(buf.data_ptr(), buf.numel(), threads, u, out.data_ptr(),
                            c10::cuda::getCurrentCUDAStream().stream());
}
int64_t bulk(const at::Tensor& buf, int64_t threads, int64_t chunk, int64_t piece, const at::Tensor& out) {
  return launch_stream_bulk(buf.data_ptr(), buf.numel(), threads, chunk, piece, out.data_ptr(),
                            c10::cuda::getCurrentCUDAStream().stream());
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("regs", &regs);
  m.def("bulk", &bulk);
}
