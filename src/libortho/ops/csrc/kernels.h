// Plain-C interface of the LibOrtho CUDA kernels (no torch headers: nvcc can build each .cu file alone).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace libortho {

// Programmatic dependent launch modes ($LIBORTHO_PDL, ops/cuda.py pdl_mode; common.cuh): launched with the attribute,
// dependents triggered after the main loop instead of right after the wait, no L2 prefetch before the wait.
// kPdlNotAfterXt: the binding launches a product plainly where it launched x's transpose right before it (M >= 2 with
// ortho), where PDL "first" at every M lost (session 44's batch 8 timeline); opt-in: batch 8 alpha 0 +1.2 %, alpha 1
// -0.5 % (session 45).
enum PdlBits : int { kPdlOn = 1, kPdlLate = 2, kPdlNoPrefetch = 4, kPdlFirstTiles = 8, kPdlNotAfterXt = 16 };
// the bits a call may carry
constexpr int kPdlAll = kPdlOn | kPdlLate | kPdlNoPrefetch | kPdlFirstTiles | kPdlNotAfterXt;

struct Operands {
  const int32_t* qweight;  // (N_pad/16, K_pad/64, 32*bits), see libortho/quant.py
  const void* scales;      // (N_pad/16, G, 16), activation dtype
  const void* zeros;       // same layout, or nullptr (symmetric: z = 2^(bits-1))
  const int32_t* row_ptr;  // CSR ortho stream (N+1)
  const void* col_idx;     // int16 or int32
  const void* values;      // activation dtype
  int64_t nnz;
  bool col16;
  float alpha;             // alpha == 0: the ortho arrays are never read
  int bits, group_size, N, K;
  bool bf16;               // activation dtype: bf16 (true) or fp16
  int pdl;                 // v1 only: programmatic dependent launch (sm_90+), kPdl* bits, see common.cuh
  const void* xt;          // v1 and the GEMM's ortho add only, or nullptr: x transposed, (K, xt_ld), rows padded with zeros
  int xt_ld;               // 2, 4, 8 or 16 (v1), 32 or 64 (ortho add): the ortho stream's rows of x for one column
  float* gemm_ws;          // gemm_sm90.cu only, or nullptr: split-K's fp32 (splits, M, N) workspace
  int pairs;               // v1 with two row tiles per block: blocks from this index on hold one (v1.cuh v1_row_pairs)
  int glu;                 // v1 at M <= 16 only: rows 16 t..+7 gate, +8..+15 up; the epilogue writes silu(gate) * up
};

// v1 at M <= 16 only, the RMSNorm around the product (libortho.norms). add-norm (residual given): the epilogue writes
// h = residual + y (each rounded as eager), out2 = norm_weight * h and part (M, N / 16) = h's sums of squares per 16
// outputs. rms (part given, no residual): the sums are scaled by r = rsqrt(sum of part's row (M, K / 16) / K + eps)
// before the bias (and the GLU activation): the product of x = g * h normalized by h's RMS.
struct NormFields {
  const void* residual;    // (M, N), activation dtype, or nullptr
  const void* norm_weight; // (N,), activation dtype (add-norm)
  void* out2;              // (M, N), activation dtype (add-norm)
  float* part;             // add-norm: written; rms: read
  float rms_eps;
};

// The norm kernels' parameters. Apart from Operands so that every other kernel's parameter block stays as it was: with
// these fields in Operands the v1 kernels without them ran 1-3 % slower at M 1-4 (H200, session 38, gpu_ab.sh against
// main: 11008x4096 M = 1 10.22 -> 10.50 us; ptxas: spills in the 3-block forms).
struct NormOperands : Operands {
  NormFields norm;
};

// xt (K, ld) = x (M, K) transposed, columns M..ld-1 zero (ld = 2, 4, 8, 16, 32, 64 >= M), for the ortho
// streams of v1 and of the GEMM: one column's M values are then one 4-128 byte load instead of M loads K apart.
cudaError_t launch_transpose_x(const void* x, void* xt, int M, int K, int ld, bool bf16, cudaStream_t stream);

// out (M, N) = x (M, K) @ deq(Q)^T + alpha * x @ S^T + bias, for 1 <= M <= 64 (INT4 at M 17-64 with an ortho stream
// in play: the stream needs x transposed in op.xt, ld 32 or 64 >= M, which the binding provides, else the default
// kernel runs).
cudaError_t launch_fused_small_m(const Operands& op, const void* x, const void* bias, void* out, int M,
                                 cudaStream_t stream);

// The same product with an RMSNorm epilogue (NormOperands; M <= 16, N and K multiples of 16): INT4 by the v1 table's
// configuration in its norm form, other widths by the default configuration; cudaErrorNotSupported where the table's
// configuration has none (v1_norms.cu; the caller then takes the product and PyTorch's steps).
cudaError_t launch_fused_small_m_norm(const NormOperands& op, const void* x, const void* bias, void* out, int M,
                                      cudaStream_t stream);

// The same product by one of the v1 tuning configurations (INT4, M up to 4-64 by configuration; see fused_cfg_dispatch).
cudaError_t launch_fused_small_m_cfg(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                                     cudaStream_t stream);

// The INT4 v1 configuration (an index of launch_fused_small_m_cfg) that launch_fused_small_m uses for each
// class of call, in this order: short grids (< 3 blocks per SM) at M <= 4 with K >= 8192, at M <= 4 with
// K < 8192, at M 5-8; tall grids at M <= 4, at M 5-8; M 9-16 below 3 row tiles per SM (K < 8192), from 3;
// tiny grids (fewer row tiles than SMs) at M <= 8; M 9-16 below 3 row tiles per SM with K >= 8192; M 17-32 (the
// base; an ortho stream in play is added after it), from one row tile per SM and below; M 33-64 (the same). A call
// with alpha != 0 and at least 2^20 ortho entries counts as a short grid, and at M <= 4 as one with K < 8192.
// set_v1_table changes nothing and returns false when an index cannot serve its class (a configuration of the
// kernel of the class's n8 column blocks, M <= 8, 16, 32 or 64, reaching its largest M; v1.cuh kV1CfgMaxM).
constexpr int kV1Classes = 12;
bool set_v1_table(const int (&table)[kV1Classes]);
void get_v1_table(int (&table)[kV1Classes]);

// Whether INT4 v1 ring calls that the ring takes whole run the configuration's lean form (v1.cuh kLean,
// v1_lean_ok); off: always the full kernel (for the tests and the probe).
void set_v1_lean(bool on);
bool v1_lean();
// Lean launches so far, counted on the host (the tests check that the lean path really runs).
int64_t& v1_lean_launches();
// The ortho-first configurations (13-16) run lean only at M <= this (default 0: never; their lean forms waited longer
// for their ring tiles at M 4-8, 2026-11-29), for a probe of M 1-2.
void set_v1_lean_ortho_first_max_m(int m);
int v1_lean_ortho_first_max_m();
// Two-row-tile v1 configurations cut their last wave's work into single row tiles where that lowers the most tiles any
// SM gets (v1.cuh v1_row_pairs; default on); off: every block holds two.
void set_v1_row_pairs_split(bool on);
bool v1_row_pairs_split();

// The same product by the v2 decode kernel (cp.async stages, cluster split-K on sm_90, nnz-balanced ortho
// rows); a misaligned buffer falls back to launch_fused_small_m.
cudaError_t launch_fused_small_m_v2(const Operands& op, const void* x, const void* bias, void* out, int M,
                                    cudaStream_t stream);

// The same product by the v3 decode kernel (no tensor cores: a bandwidth-bound GEMV for M = 1..4, cluster
// split-K); M > 16, or an x slice too large for its shared memory, falls back to launch_fused_small_m.
cudaError_t launch_fused_small_m_v3(const Operands& op, const void* x, const void* bias, void* out, int M,
                                    cudaStream_t stream);

// W (N, K) = deq(Q) + alpha * S, row-major in the activation dtype (the large-M path feeds it to cuBLAS).
cudaError_t launch_dequant_merge(const Operands& op, void* w, cudaStream_t stream);

// out (M, N) = x (M, K) @ deq(Q)^T + alpha * x @ S^T + bias: the base in one kernel (gemm_sm90.cu: INT4
// dequantized in registers into wgmma, sm_90a only), then, for alpha != 0 with ortho entries (M <=
// kGemmOrthoMaxM only), launch_ortho_add with x transposed in op.xt (ld 32 or 64). Takes calls
// gemm_int4_supported accepts (INT4, K a multiple of 64, whole groups of a multiple of 64 columns, an ortho
// stream in play only at M <= kGemmOrthoMaxM, a 9.x device) with x 16-byte aligned; otherwise
// cudaErrorInvalidValue, and cudaErrorNotSupported on a device the kernel was not built for.
constexpr int kGemmOrthoMaxM = 64;
bool gemm_int4_supported(const Operands& op, int M);
// How many K slices the large-M GEMM splits this call into (1: none). Above 1 the caller passes an fp32
// (splits, M, N) workspace in op.gemm_ws (no need to zero it): each slice writes every element of its own (M, N)
// part, and a last kernel sums the parts in slice order and writes out (+ bias).
int gemm_int4_splits(const Operands& op, int M);
// Its block configuration (gemm_sm90.cu GemmCfg0..7) for probes; -1 (the default): chosen per call (gemm_pick).
bool set_gemm_cfg(int cfg);  // false (nothing changed) outside -1..kGemmCfgs-1
int gemm_cfg();
constexpr int kGemmCfgs = 8;
cudaError_t launch_gemm_int4(const Operands& op, const void* x, const void* bias, void* out, int M, cudaStream_t stream);

// out (M, N) = x (M, K) @ deq(Q)^T by CUTLASS's mixed-input GEMM on the packed tiles (gemm_cutlass.cu; sm_90a, only in
// a build with LIBORTHO_WITH_CUTLASS, else gemm_cutlass_built() is false and every call cudaErrorNotSupported).
// Takes INT4, N a multiple of 16, K of 64, groups of whole 64-column tiles (or one per row), no ortho stream in
// play, x 16-byte aligned; ws: gemm_cutlass_workspace(op, M) bytes, 256-byte aligned (scales and zeros in CUTLASS's
// form, then CUTLASS's own workspace). No bias: the caller adds it. form: 0 = cooperative 128x128 tiles, 1 =
// ping-pong 64x128 (the caller picks; ops/cuda.py cutlass_form).
constexpr int kCutlassForms = 2;
bool gemm_cutlass_built();
bool gemm_cutlass_supported(const Operands& op, int M);
size_t gemm_cutlass_workspace(const Operands& op, int M, int form);
cudaError_t launch_gemm_cutlass(const Operands& op, const void* x, void* out, int M, void* ws, cudaStream_t stream,
                                int form);

// y (M, N) += alpha * x @ S^T, x transposed in op.xt (ld 32 or 64 >= M): ortho_add.cu. No launch at alpha 0 or
// without entries.
cudaError_t launch_ortho_add(const Operands& op, void* y, int M, cudaStream_t stream);


// Decode attention (decode_attention.cu): out (B, 1, Hq, D) = softmax(scale * q k^T + mask) v for one query token per
// sequence, q (B, Hq, 1, D), k and v (B, Hkv, L, D) with Hq a multiple of Hkv (at most kAttnMaxGroup), D 64 or 128,
// last dimensions contiguous; strides in elements (a broadcast mask dimension: stride 0). ws_acc (B, Hq, splits, D)
// and ws_ml (B, Hq, splits, 2) fp32, splits = ceil(L / chunk); no need to zero them. last_block_combines: one launch,
// the last block of each (batch, KV head) combines the chunks (tickets: set by the launcher); else a second kernel.
enum AttnMaskKind { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskBF16 = 3, kMaskF16 = 4 };
constexpr int kAttnMaxGroup = 8;
struct AttnArgs {
  const void* q;
  int64_t q_sb, q_sh;
  const void* k;
  int64_t k_sb, k_sh, k_sl;
  const void* v;
  int64_t v_sb, v_sh, v_sl;
  const void* mask;  // (B or 1, Hq or 1, L) as strides m_sb, m_sh, m_sl; nullptr with kMaskNone
  int mask_kind;
  int64_t m_sb, m_sh, m_sl;
  void* out;
  float* ws_acc;
  float* ws_ml;
  int B, Hq, Hkv, L, D, chunk, splits;
  float scale;
  bool bf16;
  bool last_block_combines;
  unsigned* tickets;
  int pdl;  // kPdl* bits: the split kernel launched with programmatic dependent launch (kPdlNoPrefetch: no meaning here)
  // The step form (decode_attention_step), or kn == nullptr: q is the projection before the rotary embedding; the
  // kernel rotates it and, for each (b, KV head), the new key row kn, and writes that and the value row vn at cache
  // position *pos (one position for every sequence; outside [0, L): nothing written) before reading them back.
  // Positions past *pos are never attended (causal at the step; the mask, if any, further excludes).
  const void* kn;
  int64_t kn_sb, kn_sh;
  const void* vn;
  int64_t vn_sb, vn_sh;
  const void* cos;  // (B, D) rows at cs_sb, the model's dtype (transformers' halves-duplicated cos and sin)
  const void* sin;
  int64_t cs_sb;
  const int64_t* pos;
};
bool decode_attention_supported(const AttnArgs& a);
cudaError_t launch_decode_attention(const AttnArgs& a, cudaStream_t stream);

}  // namespace libortho
