// Thin binding of the LibOrtho CUDA kernels: checks, allocation, stream, error propagation.
// A Python module (fused_small_m, fused_small_m_v2, fused_small_m_v3, dequant_merge, gemm_int4) that libortho/ops/cuda.py
// calls from the CUDA implementation of the public op torch.ops.libortho.ortho_linear.
//
// Errors come back as a code next to the result (0: ok, -1: invalid arguments, > 0: the cudaError_t of
// the launch), never as a C++ exception or a returned string: on the GPU image both crashed the
// interpreter (seen with torch 2.11 + nvcc 13.0 + the image's g++). libortho/ops/cuda.py validates the
// arguments with clear messages before calling and raises RuntimeError on a non-zero code.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using Result = std::tuple<at::Tensor, int64_t>;
constexpr int64_t kBadArgs = -1;
constexpr int64_t kNotTaken = -2;  // fused_small_m_norm: the call's configuration has no norm form (nothing launched)

bool operands(libortho::Operands& op, const at::Tensor& ref, const at::Tensor& qweight,
                     const at::Tensor& scales, const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const at::Tensor& values, double alpha, int64_t bits,
                     int64_t group_size, int64_t N, int64_t K) {
  const auto dt = ref.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return false;
  if (K % 2 != 0) return false;
  if (group_size <= 0 || (group_size % 32 != 0 && group_size < K))
    return false;
  const int64_t tn = (N + 15) / 16, tk = (K + 63) / 64, groups = (K + group_size - 1) / group_size;
  if (!qweight.is_cuda() || qweight.scalar_type() != at::kInt || !qweight.is_contiguous() || qweight.dim() != 3 ||
      qweight.size(0) != tn || qweight.size(1) != tk || qweight.size(2) != 32 * bits)
    return false;
  if (scales.scalar_type() != dt || !scales.is_contiguous() || scales.dim() != 3 || scales.size(0) != tn ||
      scales.size(1) != groups || scales.size(2) != 16 || scales.device() != qweight.device())
    return false;
  if (zeros && (zeros->scalar_type() != dt || zeros->sizes() != scales.sizes() || !zeros->is_contiguous()))
    return false;
  if (row_ptr.scalar_type() != at::kInt || row_ptr.numel() != N + 1 || !row_ptr.is_contiguous())
    return false;
  if ((col_idx.scalar_type() != at::kShort && col_idx.scalar_type() != at::kInt) || !col_idx.is_contiguous())
    return false;
  if (values.scalar_type() != dt || values.numel() != col_idx.numel() || !values.is_contiguous())
    return false;
  op.qweight = qweight.data_ptr<int32_t>();
  op.scales = scales.data_ptr();
  op.zeros = zeros ? zeros->data_ptr() : nullptr;
  op.row_ptr = row_ptr.data_ptr<int32_t>();
  op.col_idx = col_idx.data_ptr();
  op.values = values.data_ptr();
  op.nnz = values.numel();
  op.col16 = col_idx.scalar_type() == at::kShort;
  op.alpha = static_cast<float>(alpha);
  op.bits = static_cast<int>(bits);
  op.group_size = static_cast<int>(std::min<int64_t>(group_size, K));
  op.N = static_cast<int>(N);
  op.K = static_cast<int>(K);
  op.bf16 = dt == at::kBFloat16;
  return true;
}

using Launch = cudaError_t (*)(const libortho::Operands&, const void*, const void*, void*, int, cudaStream_t);

// v1's ortho stream reads x transposed (one load per column for all M rows instead of M loads K apart)
// when M >= 2 and nnz * M * max(M, 4) / 4 >= g_xt_min (-1: never); it costs one small transpose launch per
// call. Above M = 4 the x ring leaves the ortho stream's strided loads as the bottleneck, so the gain grows
// faster than nnz * M (H200, 12:36 UTC 2026-11-29). cuda.py sets it ($LIBORTHO_ORTHO_XT). At M 17-64 v1 runs the
// base and then the ortho add, which always reads xt.
int64_t g_xt_min = int64_t{1} << 21;

// The rows of x transposed the ortho add reads per column (ortho_add.cu: 32 or 64 >= M).
inline int add_xt_ld(int64_t M) { return M <= 32 ? 32 : 64; }

// Checks the operands of a small-M product (1 <= M <= max_m) and runs launch(op, x, bias, out, M, stream). glu: the
// rows are a gate and an up layer interleaved by 8 (libortho.glu) and v1's epilogue writes silu(gate) * up, (M, N / 2).
// x transposed for v1's ortho stream: xt_small, at M 2-16 by the g_xt_min rule (v1's own stream); xt_wide, always
// at M 17-64 for INT4 (v1's base + ortho add; v2 and v3 hand those calls to v1).
// The RMSNorm around a v1 product at M <= 16 (kernels.h NormOperands: add-norm with a residual, else rms from part).
struct NormArgs {
  const std::optional<at::Tensor>& residual;     // (M, N), x's dtype: add-norm
  const std::optional<at::Tensor>& norm_weight;  // (N,), x's dtype: add-norm
  const at::Tensor& part;                        // float32: (M, N / 16) written (add-norm), (M, K / 16) read (rms)
  double eps;
};

template <class F>
Result small_m(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
               int64_t group_size, int64_t N, int64_t K, int64_t pdl, int64_t max_m, bool xt_small, bool xt_wide,
               F&& launch, bool glu = false, const NormArgs* norm = nullptr) {
  const at::Tensor none = at::empty({0}, x.options());
  if (!x.is_cuda() || x.dim() != 2 || x.size(1) != K || !x.is_contiguous())
    return {none, kBadArgs};
  const int64_t M = x.size(0);
  if (M < 1 || M > max_m) return {none, kBadArgs};
  libortho::NormOperands op{};  // the norm fields read only by the norm launch (kernels.h)
  if (!operands(op, x, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size, N, K))
    return {none, kBadArgs};
  if (bias && (bias->scalar_type() != x.scalar_type() || bias->numel() != N || !bias->is_contiguous()))
    return {none, kBadArgs};
  if (pdl < 0 || pdl > libortho::kPdlAll) return {none, kBadArgs};
  op.pdl = static_cast<int>(pdl);
  if (glu && N % 16 != 0) return {none, kBadArgs};
  op.glu = glu ? 1 : 0;
  const bool add_norm = norm != nullptr && norm->residual.has_value();
  if (norm != nullptr) {
    const at::Tensor& p = norm->part;
    const int64_t cols = add_norm ? N / 16 : K / 16;
    if (M > 16 || N % 16 != 0 || K % 16 != 0 || (add_norm && glu) || !p.is_cuda() || p.device() != x.device() ||
        p.scalar_type() != at::kFloat || !p.is_contiguous() || p.dim() != 2 || p.size(0) != M || p.size(1) != cols)
      return {none, kBadArgs};
    if (add_norm) {
      const at::Tensor& r = *norm->residual;
      if (!norm->norm_weight || r.scalar_type() != x.scalar_type() || !r.is_contiguous() || r.dim() != 2 ||
          r.size(0) != M || r.size(1) != N || r.device() != x.device())
        return {none, kBadArgs};
      const at::Tensor& g = *norm->norm_weight;
      if (g.scalar_type() != x.scalar_type() || !g.is_contiguous() || g.numel() != N || g.device() != x.device())
        return {none, kBadArgs};
      op.norm.residual = r.data_ptr();
      op.norm.norm_weight = g.data_ptr();
    }
    op.norm.part = p.data_ptr<float>();
    op.norm.rms_eps = static_cast<float>(norm->eps);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor xt;  // alive until the launch is queued; the allocator reuses it in stream order
  const bool wide = xt_wide && op.bits == 4 && M > 16;
  const bool small = xt_small && M >= 2 && M <= 16 && g_xt_min >= 0 &&
                     op.nnz * M * std::max<int64_t>(M, 4) >= 4 * g_xt_min;
  if (op.alpha != 0.f && op.nnz > 0 && (wide || small)) {
    // rows per ortho entry: v1's own stream (MR) at M <= 16, the add's above
    const int ld = M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : M <= 16 ? 16 : add_xt_ld(M);
    xt = at::empty({K, ld}, x.options());
    const cudaError_t err = libortho::launch_transpose_x(x.data_ptr(), xt.data_ptr(), static_cast<int>(M),
                                                         static_cast<int>(K), ld, op.bf16, stream);
    if (err != cudaSuccess) return {none, static_cast<int64_t>(err)};
    op.xt = xt.data_ptr();
    op.xt_ld = ld;
  }
  if (op.pdl & libortho::kPdlNotAfterXt) op.pdl = op.xt ? 0 : op.pdl & ~libortho::kPdlNotAfterXt;
  auto out = add_norm ? at::empty({2, M, N}, x.options()) : at::empty({M, glu ? N / 2 : N}, x.options());
  if (add_norm) op.norm.out2 = out[1].data_ptr();  // plane 0 (h) is where the kernel's out points
  const cudaError_t err = launch(op, x.data_ptr(), bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                                 static_cast<int>(M), stream);
  return {out, static_cast<int64_t>(err)};
}

// One binding for the three small-M kernels; the launcher is a template argument so that each variant
// is a plain function for pybind.
template <Launch launch>
Result fused(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
             const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
             int64_t group_size, int64_t N, int64_t K, int64_t pdl) {
  return small_m(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, N, K, pdl, 64,
                 launch == &libortho::launch_fused_small_m, true, launch);
}

// v1 at M <= 16 with the GLU epilogue (small_m's glu).
Result fused_glu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                 const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
                 int64_t group_size, int64_t N, int64_t K, int64_t pdl) {
  return small_m(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, N, K, pdl, 16,
                 true, false, &libortho::launch_fused_small_m, true);
}

// v1 at M <= 16 with an RMSNorm epilogue (NormArgs): add-norm -> (2, M, N) = (h, g * h), part written; rms ->
// (M, N) or, glu, (M, N / 2), part read. kNotTaken where the table's configuration has no norm form.
Result fused_norm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                  const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
                  int64_t group_size, int64_t N, int64_t K, int64_t pdl, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& norm_weight, const at::Tensor& part, double eps, bool glu) {
  const NormArgs norm{residual, norm_weight, part, eps};
  Result r = small_m(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, N, K, pdl, 16,
                     true, false, &libortho::launch_fused_small_m_norm, glu, &norm);
  if (std::get<1>(r) == static_cast<int64_t>(cudaErrorNotSupported)) std::get<1>(r) = kNotTaken;
  return r;
}

// v1 with tuning configuration `cfg` (benchmarks/probes/v1_configs.py), plain launches.
Result fused_cfg(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                 const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
                 int64_t group_size, int64_t N, int64_t K, int64_t cfg) {
  return small_m(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, N, K, 0, 64,
                 true, false, [cfg](const libortho::Operands& op, const void* xp, const void* bp, void* out, int M, cudaStream_t s) {
                   return libortho::launch_fused_small_m_cfg(op, xp, bp, out, M, static_cast<int>(cfg), s);
                 });
}

Result dequant_merge(const at::Tensor& like, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& values, double alpha, int64_t bits, int64_t group_size, int64_t N, int64_t K) {
  libortho::Operands op{};
  if (!operands(op, like, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size, N, K))
    return {at::empty({0}, like.options()), kBadArgs};
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto w = at::empty({N, K}, like.options().device(qweight.device()));
  const cudaError_t err = libortho::launch_dequant_merge(op, w.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  return {w, static_cast<int64_t>(err)};
}

// The one-kernel large-M product (gemm_sm90.cu: INT4 base, sm_90a; any M >= 1) and, at M <= 64 with an ortho
// stream in play, the ortho add after it (ortho_add.cu, x transposed first). A call the kernel splits along K
// gets its fp32 workspace here (one (M, N) slice per split); both buffers come from torch's allocator,
// stream-ordered.
Result gemm_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                 const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                 const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
                 int64_t group_size, int64_t N, int64_t K) {
  at::Tensor ws, xt;  // alive until the launches are queued
  return small_m(x, qweight, scales, zeros, row_ptr, col_idx, values, bias, alpha, bits, group_size, N, K, false,
                 std::numeric_limits<int>::max(), false, false,
                 [&ws, &xt, &x](const libortho::Operands& op, const void* xp, const void* bp, void* out, int M, cudaStream_t s) {
                   if (!libortho::gemm_int4_supported(op, M)) return cudaErrorInvalidValue;
                   libortho::Operands o = op;
                   const int splits = libortho::gemm_int4_splits(op, M);
                   if (splits > 1) {
                     ws = at::empty({splits, M, op.N}, x.options().dtype(at::kFloat));
                     o.gemm_ws = ws.data_ptr<float>();
                   }
                   if (op.alpha != 0.f && op.nnz > 0) {
                     const int ld = add_xt_ld(M);
                     xt = at::empty({op.K, ld}, x.options());
                     const cudaError_t e = libortho::launch_transpose_x(xp, xt.data_ptr(), M, op.K, ld, op.bf16, s);
                     if (e != cudaSuccess) return e;
                     o.xt = xt.data_ptr();
                     o.xt_ld = ld;
                   }
                   return libortho::launch_gemm_int4(o, xp, bp, out, M, s);
                 });
}

// The large-M base product by CUTLASS's mixed-input GEMM on the packed tiles (gemm_cutlass.cu, a build with
// CUTLASS only). Its workspace (scales and zeros in CUTLASS's form, then CUTLASS's own) comes from torch's allocator,
// stream-ordered; the bias is added after it.
Result gemm_cutlass(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                    const at::Tensor& values, const std::optional<at::Tensor>& bias, double alpha, int64_t bits,
                    int64_t group_size, int64_t N, int64_t K, int64_t form) {
  const at::Tensor none = at::empty({0}, x.options());
  if (!x.is_cuda() || x.dim() != 2 || x.size(1) != K || !x.is_contiguous() || x.size(0) < 1 || form < 0 ||
      form >= libortho::kCutlassForms)
    return {none, kBadArgs};
  const int64_t M = x.size(0);
  libortho::Operands op{};
  if (!operands(op, x, qweight, scales, zeros, row_ptr, col_idx, values, alpha, bits, group_size, N, K) ||
      !libortho::gemm_cutlass_supported(op, static_cast<int>(M)) || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16)
    return {none, kBadArgs};
  if (bias && (bias->scalar_type() != x.scalar_type() || bias->numel() != N || !bias->is_contiguous()))
    return {none, kBadArgs};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int f = static_cast<int>(form);
  const auto bytes = static_cast<int64_t>(libortho::gemm_cutlass_workspace(op, static_cast<int>(M), f));
  auto ws = at::empty({bytes}, x.options().dtype(at::kByte));  // 512-byte aligned by the caching allocator
  auto out = at::empty({M, N}, x.options());
  const cudaError_t err = libortho::launch_gemm_cutlass(op, x.data_ptr(), out.data_ptr(), static_cast<int>(M),
                                                        ws.data_ptr(), stream, f);
  if (err == cudaSuccess && bias) out.add_(*bias);
  return {out, static_cast<int64_t>(err)};
}

int64_t ortho_xt_min() { return g_xt_min; }
void set_ortho_xt_min(int64_t v) { g_xt_min = v < 0 ? -1 : v; }

std::vector<int64_t> v1_table() {
  int t[libortho::kV1Classes];
  libortho::get_v1_table(t);
  return std::vector<int64_t>(t, t + libortho::kV1Classes);
}

bool set_v1_table(const std::vector<int64_t>& table) {
  if (table.size() != libortho::kV1Classes) return false;
  int t[libortho::kV1Classes];
  for (int c = 0; c < libortho::kV1Classes; ++c) t[c] = static_cast<int>(table[c]);
  return libortho::set_v1_table(t);
}


// Decode attention (decode_attention.cu): q (B, Hq, 1, D), k and v (B, Hkv, L, D), mask None or (B|1, Hq|1, 1, L)
// boolean or additive (fp32 / the activation dtype), last dimensions contiguous and rows 16-byte aligned; out
// (B, 1, Hq, D). ops/attention.py checks the arguments with clear messages first. `step` (may be null) adds the
// step form's operands (decode_attention_step) before the launch; false from it: invalid arguments.
template <class Step>
Result attention_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& mask, double scale, int64_t chunk, bool last_block_combines,
                      int64_t pdl, Step&& step) {
  const at::Tensor none;
  const auto dt = q.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || k.scalar_type() != dt || v.scalar_type() != dt) return {none, kBadArgs};
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || !q.is_cuda() || k.device() != q.device() ||
      v.device() != q.device() || k.sizes() != v.sizes())
    return {none, kBadArgs};
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  if (q.size(2) != 1 || k.size(0) != B || k.size(3) != D || chunk <= 0) return {none, kBadArgs};
  const int64_t align = 16 / q.element_size();  // elements of a 16-byte step
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->stride(3) != 1 || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return {none, kBadArgs};
    for (int d = 0; d < 3; ++d)
      if (t->size(d) > 1 && t->stride(d) % align) return {none, kBadArgs};
  }
  libortho::AttnArgs a{};
  a.q = q.data_ptr(); a.q_sb = q.stride(0); a.q_sh = q.stride(1);
  a.k = k.data_ptr(); a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_sl = k.stride(2);
  a.v = v.data_ptr(); a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_sl = v.stride(2);
  a.mask_kind = libortho::kMaskNone;
  if (mask) {
    const auto& m = *mask;
    const auto mt = m.scalar_type();
    a.mask_kind = mt == at::kBool ? libortho::kMaskBool : mt == at::kFloat ? libortho::kMaskF32
                : mt == at::kBFloat16 ? libortho::kMaskBF16 : mt == at::kHalf ? libortho::kMaskF16 : -1;
    if (a.mask_kind < 0 || m.dim() != 4 || m.device() != q.device() || m.size(2) != 1 || m.size(3) != L ||
        (m.size(0) != 1 && m.size(0) != B) || (m.size(1) != 1 && m.size(1) != Hq))
      return {none, kBadArgs};
    a.mask = m.data_ptr();
    a.m_sb = m.size(0) == 1 ? 0 : m.stride(0);
    a.m_sh = m.size(1) == 1 ? 0 : m.stride(1);
    a.m_sl = m.stride(3);
  }
  a.B = static_cast<int>(B); a.Hq = static_cast<int>(Hq); a.Hkv = static_cast<int>(Hkv);
  a.L = static_cast<int>(L); a.D = static_cast<int>(D);
  a.chunk = static_cast<int>(chunk); a.splits = static_cast<int>((L + chunk - 1) / chunk);
  a.scale = static_cast<float>(scale); a.bf16 = dt == at::kBFloat16;
  a.last_block_combines = last_block_combines;
  if (pdl < 0 || pdl > libortho::kPdlAll) return {none, kBadArgs};
  a.pdl = static_cast<int>(pdl);
  if (!libortho::decode_attention_supported(a) || !step(a)) return {none, kBadArgs};
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto out = at::empty({B, 1, Hq, D}, q.options());
  auto ws_acc = at::empty({B, Hq, a.splits, D}, q.options().dtype(at::kFloat));
  auto ws_ml = at::empty({B, Hq, a.splits, 2}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr(); a.ws_acc = ws_acc.data_ptr<float>(); a.ws_ml = ws_ml.data_ptr<float>();
  return {out, static_cast<int64_t>(libortho::launch_decode_attention(a, stream))};
}

Result decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, double scale, int64_t chunk,
                        bool last_block_combines, int64_t pdl) {
  return attention_call(q, k, v, mask, scale, chunk, last_block_combines, pdl,
                        [](libortho::AttnArgs&) { return true; });
}

// The step form: q (B, Hq, 1, D) before the rotary embedding; k_new and v_new (B, Hkv, 1, D) the step's projections
// (k_new before the rotary embedding); cos and sin (B or 1, 1, D) in the activation dtype; pos a one-element int64
// tensor, the cache position of the step (the same for every sequence). k and v, the caches, get the new rows.
Result decode_attention_step(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                             const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& pos, const std::optional<at::Tensor>& mask, double scale,
                             int64_t chunk, bool last_block_combines, int64_t pdl) {
  return attention_call(q, k, v, mask, scale, chunk, last_block_combines, pdl, [&](libortho::AttnArgs& a) {
    const int64_t B = a.B, Hkv = a.Hkv, D = a.D, align = 16 / q.element_size();
    for (const at::Tensor* t : {&k_new, &v_new}) {
      if (t->scalar_type() != q.scalar_type() || t->device() != q.device() || t->dim() != 4 || t->size(0) != B ||
          t->size(1) != Hkv || t->size(2) != 1 || t->size(3) != D || t->stride(3) != 1 ||
          reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 || (B > 1 && t->stride(0) % align) ||
          (Hkv > 1 && t->stride(1) % align))
        return false;
    }
    for (const at::Tensor* t : {&cos, &sin}) {
      if (t->scalar_type() != q.scalar_type() || t->device() != q.device() || t->dim() != 3 ||
          t->size(0) != cos.size(0) || (t->size(0) != B && t->size(0) != 1) || t->size(1) != 1 || t->size(2) != D ||
          t->stride(2) != 1 || t->stride(0) != cos.stride(0) || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 ||
          (t->size(0) > 1 && t->stride(0) % align))
        return false;
    }
    if (pos.scalar_type() != at::kLong || pos.numel() != 1 || pos.device() != q.device()) return false;
    a.kn = k_new.data_ptr(); a.kn_sb = k_new.stride(0); a.kn_sh = k_new.stride(1);
    a.vn = v_new.data_ptr(); a.vn_sb = v_new.stride(0); a.vn_sh = v_new.stride(1);
    a.cos = cos.data_ptr(); a.sin = sin.data_ptr(); a.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);
    a.pos = pos.data_ptr<int64_t>();
    return true;
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_small_m", &fused<&libortho::launch_fused_small_m>, "(x @ deq(Q)^T + alpha x @ S^T + bias, error code), 1 <= M <= 64; last argument: PDL mode bits (v1; kernels.h kPdl*)");
  m.def("fused_small_m_glu", &fused_glu, "v1 at 1 <= M <= 16 on a gate and an up layer interleaved by 8 rows: "
        "(silu(gate) * up, (M, N / 2), error code); libortho.glu");
  m.def("fused_small_m_norm", &fused_norm, "v1 at 1 <= M <= 16 with the RMSNorm epilogue: residual given, "
        "((h, g * h) as (2, M, N), error code) and part (M, N / 16) written; else the sums scaled by the RMS from part "
        "(M, K / 16), glu as fused_small_m_glu; libortho.norms");
  m.def("fused_small_m_v2", &fused<&libortho::launch_fused_small_m_v2>, "the same by the v2 decode kernel (LIBORTHO_DECODE_KERNEL=v2)");
  m.def("fused_small_m_v3", &fused<&libortho::launch_fused_small_m_v3>, "the same by the v3 decode kernel (LIBORTHO_DECODE_KERNEL=v3)");
  m.def("ortho_xt_min", &ortho_xt_min, "v1 reads x transposed in its ortho stream when M >= 2 and nnz * M * max(M, 4) / 4 >= this (-1: never)");
  m.def("set_ortho_xt_min", &set_ortho_xt_min, "set that threshold (negative: never)");
  m.def("v1_table", &v1_table, "the INT4 v1 configuration per class of call (kernels.h, cuda.V1_CLASSES)");
  m.def("set_v1_table", &set_v1_table, "replace that table; False (nothing changed) for an index its class cannot take");
  m.def("v1_lean", &libortho::v1_lean, "whether v1 ring calls the ring takes whole run the lean kernels");
  m.def("set_v1_lean", &libortho::set_v1_lean, "turn the lean kernels on or off");
  m.def("v1_lean_ortho_first_max_m", &libortho::v1_lean_ortho_first_max_m, "ortho-first configurations run lean up to this M");
  m.def("set_v1_lean_ortho_first_max_m", &libortho::set_v1_lean_ortho_first_max_m, "set that M (0: never)");
  m.def("v1_row_pairs_split", &libortho::v1_row_pairs_split, "two-row-tile v1 blocks: last wave cut into single tiles");
  m.def("set_v1_row_pairs_split", &libortho::set_v1_row_pairs_split, "turn that cut on or off");
  m.def("v1_lean_launches", [] { return libortho::v1_lean_launches(); }, "lean v1 launches so far (tests)");
  m.def("fused_small_m_cfg", &fused_cfg, "v1 with a tuning configuration (INT4, M up to the configuration's 4-64; benchmarks/probes/v1_configs.py)");
  m.def("dequant_merge", &dequant_merge, "(W = deq(Q) + alpha S as a dense matrix, error code)");
  m.def("set_gemm_cfg", [](int64_t c) { return c >= -1 && c < libortho::kGemmCfgs && libortho::set_gemm_cfg(static_cast<int>(c)); },
        "the large-M GEMM kernel's block configuration (0..7, -1: chosen per call); False for another value");
  m.def("gemm_cfg", [] { return static_cast<int64_t>(libortho::gemm_cfg()); }, "that configuration");
  m.def("gemm_cutlass", &gemm_cutlass, "(x @ deq(Q)^T + bias, error code) by CUTLASS's mixed-input GEMM on the packed "
        "tiles (INT4, N % 16 == 0, K % 64 == 0, no ortho stream in play; a build with CUTLASS only); last argument the "
        "form: 0 cooperative 128x128 tiles, 1 ping-pong 64x128");
  m.def("gemm_cutlass_built", &libortho::gemm_cutlass_built, "whether this build has the CUTLASS GEMM");
  m.def("decode_attention", &decode_attention, "(softmax(scale q k^T + mask) v for one query token, error code): q (B, Hq, 1, "
        "D), k and v (B, Hkv, L, D), out (B, 1, Hq, D); then cache positions per block, and whether the last block of "
        "each head combines the blocks (one launch) rather than a second kernel, and the PDL mode bits (kernels.h kPdl*)");
  m.def("decode_attention_step", &decode_attention_step, "(the decode step's attention, error code): q, k_new, v_new "
        "before the rotary embedding, cos, sin, the K and V caches (the new rows written at pos), pos, mask, scale, "
        "chunk, last-block combine, PDL mode bits");
  m.def("gemm_int4", &gemm_int4, "(x @ deq(Q)^T + alpha x @ S^T + bias, error code): INT4 base in one kernel (sm_90a), "
        "the ortho stream (M <= 64 only) in a second");
}
