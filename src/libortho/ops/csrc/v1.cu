// The v1 decode kernel's entry point: INT4 at M <= 64 by the configuration table (v1_configs*.cu; at M 17-64 an
// ortho stream in play is added after it by ortho_add.cu); every other width by the default configuration.
#include "v1.cuh"

namespace libortho {
namespace {

// The INT4 v1 configuration for each class of call (kernels.h, set_v1_table), as the probe
// (benchmarks/probes/v1_configs.py, results/v1-configs-H200*.json, 2026-11-29 11:03 and 13:08 UTC) suggested
// it: the 4-slot ring carrying x's columns, its 4-row form at M <= 4, 8 rows at M 5-8, 16 rows at M 9-16;
// on tall grids at M <= 8 32 output rows per block (11); on short grids at M <= 8 the ortho stream first
// (14, 16; probe of 2026-11-29 14:02 UTC, 1 % ortho); at M 9-16 the 16-row x ring (10), on tall grids with
// 32 rows (12). Once 8-12 ran lean (v1.cuh kLean; probe of 17:2x UTC) the tall grids at M <= 4 moved from
// 15 to 11, and M 9-16 on 256 row tiles (the 4096-row layers) from 12 to 10: that class now starts where
// the M <= 8 tall classes do (3 row tiles per SM), as 10 lost to 12 only on 11008 and 14336 rows.
// With 16 warps per block (kBlockWarps; probe of 2026-11-29 18:3x UTC, results/v1-configs-H200-warps.json) the
// short grids at M 5-8 and with K >= 8192 took 20 (32 rows, one block of 16 warps per SM) and M 9-16 with
// K >= 8192 took 22 (a class of its own); grids of fewer row tiles than SMs (1024-row layers) got a class at
// M <= 8 (18: 12 warps), as 32-row blocks leave most SMs idle there. A heavy ortho stream at M <= 4 on long K
// takes short_m4's configuration: with 20 it was 8-14 % slower at 5 % (4096x11008 M = 4: 30.7 -> 35.1 us).
// Tall grids then took 32-row blocks at 3 blocks per SM (25 at M <= 4, 24 at M 5-8; probe of 2026-11-29
// 19:4x UTC, results/v1-configs-H200-3blk.json): one wave where 11 needed 1.3 (11008x4096 M = 1: 11.35 ->
// 10.46 us at alpha 0, 17.21 -> 14.25 at 1 % ortho; the fused q/k/v 12288x4096 11.70 -> 10.53).
// cuda.py replaces entries for a tuning run ($LIBORTHO_V1_CFG).
// M 17-32 (probe of 2026-11-30 05:2x UTC, results/v1-configs-H200-m32.json; alpha 0): 32-row blocks at 1 per SM (27)
// where there is at least a row tile per SM, 16-row blocks (26) below; 0.55-0.93x the time of the GEMM that served
// these calls (4096x4096 M = 32: 9.3 against 15.0 us). An ortho stream in play is added after the base by the
// ortho add (fused_dispatch_nt). Then (probe of 2026-11-30 06:2x UTC, results/v1-configs-H200-sums-in-ring.json) 32
// replaced 27: the same 32-row blocks with a 4th ring slot, which the sums kept in the ring make room for (0.94-0.97x
// 27's time on the five large shapes at M 17 and 32). M 33-64 (class 11) takes 31, 32-row blocks whose sums live in
// the ring; cuda.py sends it only the calls where it beat the GEMM (use_v1_wide).
int g_v1_table[kV1Classes] = {20, 16, 20, 25, 24, 10, 12, 18, 22, 32, 26, 31};

// From this many ortho entries (with alpha != 0) a grid counts as short at M >= 2: the tall classes' 32-row
// blocks halve the blocks that share the ortho stream, and at 5 % ortho (2.25M entries on 11008x4096) that cost
// more than the halved x reads saved (configuration 11: M = 1 21.8 -> 27.1 us, M = 16 60.6 -> 71.9 us; at 1 %
// they won). At M = 1 the tall class stays: configuration 25 (3 blocks per SM) beat 16 at 5 % (probe of
// 2026-11-29 21:26 UTC, results/v1-configs-H200-5pct.json: 11008x4096 23.09 -> 19.57 us, 12288x4096 22.82 ->
// 20.14, 22016x4096 41.43 -> 35.17; 14336x4096 28.78 -> 29.58), while at M = 4 16 still won everywhere.
constexpr int64_t kHeavyOrtho = int64_t{1} << 20;

inline int v1_class(const Operands& op, int M) {
  const bool heavy = op.alpha != 0.f && op.nnz >= kHeavyOrtho;
  const int row_tiles = (op.N + 15) / 16, sms = device_info().sms;
  if (M > 32) return 11;
  if (M > 16) return row_tiles < sms ? 10 : 9;
  if (M > 8) return row_tiles >= 3 * sms && !heavy ? 6 : op.K >= 8192 ? 8 : 5;
  if (row_tiles >= 3 * sms && !(heavy && M > 1)) return M <= 4 ? 3 : 4;
  if (row_tiles < sms) return 7;
  if (M > 4) return 2;
  return op.K >= 8192 && !heavy ? 0 : 1;  // a heavy stream on long K keeps 16-row blocks (short_m4)
}

template <typename T, int BITS>
cudaError_t fused_dispatch_nt(const Operands& op, const void* x, const void* bias, void* out, int M,
                              cudaStream_t s) {
  if constexpr (BITS == 4) {
    if (M <= 16 || op.alpha == 0.f || op.nnz == 0)
      return launch_fused_small_m_cfg(op, x, bias, out, M, g_v1_table[v1_class(op, M)], s);
    if (op.xt != nullptr && (op.xt_ld == 32 || op.xt_ld == 64) && M <= op.xt_ld) {
      // The base by the table's configuration, then the ortho add in place (ortho_add.cu, x transposed): the
      // wider kernel's own stream (atomics over 32 rows per entry) was 2-6x slower than the GEMM + that add.
      Operands base = op;
      base.alpha = 0.f;
      const cudaError_t err = launch_fused_small_m_cfg(base, x, bias, out, M, g_v1_table[v1_class(base, M)], s);
      return err != cudaSuccess ? err : launch_ortho_add(op, out, M, s);
    }
  }
  auto kernel = M <= 8 ? fused_small_m_kernel<T, BITS, 1> : M <= 16 ? fused_small_m_kernel<T, BITS, 2>
               : M <= 32 ? fused_small_m_kernel<T, BITS, 4> : fused_small_m_kernel<T, BITS, 8>;
  return launch_v1<T>(kernel, op, x, bias, out, M, s);
}

template <typename T>
cudaError_t fused_dispatch(const Operands& op, const void* x, const void* bias, void* out, int M,
                           cudaStream_t s) {
  return with_bits(op.bits, [&](auto b) { return fused_dispatch_nt<T, decltype(b)::value>(op, x, bias, out, M, s); });
}

}  // namespace

cudaError_t launch_fused_small_m(const Operands& op, const void* x, const void* bias, void* out, int M,
                                 cudaStream_t stream) {
  if (M < 1 || M > 64 || op.K % 2 != 0) return cudaErrorInvalidValue;
  return op.bf16 ? fused_dispatch<__nv_bfloat16>(op, x, bias, out, M, stream)
                 : fused_dispatch<__half>(op, x, bias, out, M, stream);
}

cudaError_t launch_fused_small_m_norm(const NormOperands& op, const void* x, const void* bias, void* out, int M,
                                      cudaStream_t stream) {
  // the class's configuration in its norm form (v1_norms.cu)
  return launch_v1_norm(op, x, bias, out, M, op.bits == 4 ? g_v1_table[v1_class(op, M)] : -1, stream);
}

bool set_v1_table(const int (&table)[kV1Classes]) {
  // A class takes the configurations of its kernel (M <= 8, 16, 32 or 64) that reach its largest M.
  constexpr int kClassMaxM[kV1Classes] = {4, 4, 8, 4, 8, 16, 16, 8, 16, 32, 32, 64};
  for (int c = 0; c < kV1Classes; ++c) {
    const int i = table[c];
    const auto nt = [](int m) { return (m + 7) / 8; };  // n8 column blocks of the kernel
    if (i < 0 || i >= kV1Cfgs || kV1CfgMaxM[i] < kClassMaxM[c] || nt(kV1CfgMaxM[i]) != nt(kClassMaxM[c]))
      return false;
  }
  std::copy(table, table + kV1Classes, g_v1_table);
  return true;
}

void get_v1_table(int (&table)[kV1Classes]) { std::copy(g_v1_table, g_v1_table + kV1Classes, table); }

namespace {
bool g_v1_lean = true;
int g_lean_ortho_first_max_m = 0;
bool g_row_pairs_split = true;
}  // namespace

void set_v1_lean(bool on) { g_v1_lean = on; }
bool v1_lean() { return g_v1_lean; }
void set_v1_lean_ortho_first_max_m(int m) { g_lean_ortho_first_max_m = m; }
int v1_lean_ortho_first_max_m() { return g_lean_ortho_first_max_m; }
void set_v1_row_pairs_split(bool on) { g_row_pairs_split = on; }
bool v1_row_pairs_split() { return g_row_pairs_split; }
int64_t& v1_lean_launches() {
  static int64_t n = 0;
  return n;
}

}  // namespace libortho
