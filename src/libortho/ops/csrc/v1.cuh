// The v1 decode kernel (M <= 64, fused base + ortho stream, one block per 16 output rows) and its launch;
// v1.cu picks a configuration per class of call, v1_configs.cu instantiates the tuning configurations.
#pragma once
#include "common.cuh"

namespace libortho {
namespace {

// Tuning knobs of the v1 kernel (benchmarks/probes/v1_configs.py times alternatives): K tiles per chunk
// (two chunks in flight), whether x fragments are fetched with the chunk, the occupancy floor, and
// kStages > 0: INT4 weights, scales and zeros come through a per-warp ring of kStages tiles in shared
// memory filled by cp.async (kStages - 1 tiles in flight without holding registers; see ring_sweep);
// kXRows > 0: so do the tile's columns of x (M <= kXRows rows), read back with ldmatrix. A ring too large
// to sit beside the kernel's other static shared memory (~12 KB) under the 48 KB static limit lives in
// dynamic shared memory (kRingBytes; the x ring from 8 rows). kRowTiles = 2: a block computes 32 output
// rows (two row tiles) from one x ring, halving the x a block reads per output row (at M = 16 every
// 16-row block read 128 KB of x from L2 at K = 4096, 4x its weight bytes).
// kOrthoFirst (ring only): the warp runs its ortho entries right after requesting its first ring tiles,
// straight from global memory, while those tiles are in flight, instead of after its sweep (where nothing
// hides their latency and every block of a wave waits on it at once).
// kLean (ring only): the launcher has checked that the ring takes the whole call (v1_lean_ok), so the
// kernel is compiled without the fallback sweep, the short last tile and, with kOrthoFirst, the ortho runs
// after the sweep. ncu (4096-row strips, 11008x4096): the executed code was spread over 170 KB of SASS and
// a third of the stall samples were instruction fetches at the jumps between its pieces. Not for the
// ortho-first configurations: their lean forms were 11-34 % slower at M 4-8 (H200, 2026-11-29: probe
// results/v1-configs-H200-lean-*.json, pairs results/logs/lean-ortho-first-H200.log), the others 2-12 % faster.
// kBlockWarps (ring only, lean only): warps per block other than kWarps. On short grids (256 blocks of 8 warps
// on 132 SMs) an SM holds 16 warps, each streaming a chain of 8 (K = 4096) to 22 tiles; 12-warp blocks put
// 24 warps on an SM at 2 blocks (registers permitting), 16-warp blocks of 32 rows keep 16 warps on half as
// many blocks with two row tiles per warp. Where a call is not lean (v1_lean_ok) it runs the same
// configuration with kWarps (launch_v1_ring), so the fallback paths stay 8-warp code.
// kRedInRing (x ring in dynamic shared memory, not ortho-first): a warp's partial sums go to its own x ring once its
// sweep is done (no copy can still be landing there: the ring's last requests past the end are empty), so the
// static per-warp sums array (R x (MT + 1) floats per warp, 66 KB at 32 rows and 64 tokens) does not count against
// the 48 KB static limit and the ring can take more slots.
template <int kU_, bool kPrefetchX_, int kMinBlocks_, int kStages_ = 0, int kXRows_ = 0, int kRowTiles_ = 1,
          bool kOrthoFirst_ = false, bool kLean_ = false, int kBlockWarps_ = kWarps, bool kRedInRing_ = false>
struct V1Cfg {
  static constexpr int kU = kU_;
  static constexpr bool kPrefetchX = kPrefetchX_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kStages = kStages_;
  static constexpr int kXRows = kXRows_;
  static constexpr int kRowTiles = kRowTiles_;
  static constexpr bool kOrthoFirst = kOrthoFirst_;
  static constexpr bool kLean = kLean_;
  static constexpr int kBlockWarps = kBlockWarps_;
  static constexpr bool kRedInRing = kRedInRing_;
  using Lean = V1Cfg<kU_, kPrefetchX_, kMinBlocks_, kStages_, kXRows_, kRowTiles_, kOrthoFirst_, true, kBlockWarps_,
                     kRedInRing_>;
  using Eight = V1Cfg<kU_, kPrefetchX_, kMinBlocks_, kStages_, kXRows_, kRowTiles_, kOrthoFirst_, false, kWarps,
                      kRedInRing_>;
  static_assert(!kLean_ || kStages_ > 0, "only the ring has a lean form");
  static_assert(!kOrthoFirst_ || kStages_ > 0, "the ortho stream first needs the ring");
  static_assert(kRowTiles_ == 1 || (kRowTiles_ == 2 && kStages_ > 0), "two row tiles need the ring");
  static_assert(kBlockWarps_ == kWarps || kStages_ > 0, "other warp counts: the ring only");
  // per warp and slot and row tile: 512 weight bytes, 64 bytes of scales and zeros; 128 bytes per row of x
  static constexpr int kRingSize = kBlockWarps_ * kStages_ * (kRowTiles_ * (512 + 64) + kXRows_ * 128);
  static constexpr bool kDynRing = kRingSize > 36 * 1024;
  static constexpr int kRingBytes = kDynRing ? kRingSize : 0;
  static_assert(!kRedInRing_ || (kDynRing && !kOrthoFirst_ && kXRows_ > 0 &&
                                 16 * kRowTiles_ * (8 * ((kXRows_ + 7) / 8) + 1) * 4 <= kStages_ * kXRows_ * 128),
                "the sums in the ring: a dynamic x ring that holds a warp's sums, filled after the sweep");
};

// Four 8x8 16-bit matrices from shared memory, one row address per lane (lanes 8q..8q+7: matrix q):
// thread t gets row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1 of each, as mma's B fragments want them.
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

// Elements between the scale rows of a warp's consecutive tiles (W * 64 columns apart) for
// ring_sweep: a fixed number of groups when the group size is a power of two dividing that span, 0 for one
// group per row; -1 (other sizes): no ring.
template <int W>
__host__ __device__ inline int ring_pstep(const GroupIndex& gi) {
  constexpr int kSpan = W * 64;
  if (gi.shift == 31) return 0;
  return gi.shift >= 0 && ((kSpan >> gi.shift) << gi.shift) == kSpan ? (kSpan >> gi.shift) * 16 : -1;
}

// One warp's full INT4 tiles (warp, warp + W, ...; nt of them; W warps per block) through a ring of S slots in shared
// memory: each slot holds the tile's 512 weight bytes (16 per lane) and the 16 scales and 16 zeros of its
// group (tiles of one group only: the caller checks GroupIndex::same and ring_pstep). Tile j + S - 1 is
// requested while tile j is computed, so S - 1 tiles are in flight with no registers held for them; x
// fragments (L2 hits) are loaded one tile ahead into registers. `on_first` runs once, after the first
// requests (the ortho staging, whose cp.async group then sits among the ring's: the waits stay correct, one
// tile less deep); `on_later` once after the first tile (at M <= 8 on warps of 3 tiles or more; else with
// on_first).
// XR > 0 (M <= XR <= 8 NT): the tile's 64 columns of x's M rows come through the ring too (16-byte
// cp.async, XR / 4 per lane; 16-byte chunks XOR-swizzled by row so ldmatrix reads them without bank
// conflicts) and are read back with two ldmatrix.x4 per n8 column block instead of 8 global loads; rows
// past M read row 0. The caller checks that x rows are 16-byte aligned (K % 8 == 0, x aligned).
// RT = 2: each slot also holds a second row tile (weights rt_q int32 and scales / zeros rt_p elements after
// the first's; 0 when the block has only one), computed with the same x fragments. rts: the row tiles computed
// (callers without the cut pass RT, and a repeated second tile is computed).
template <int S, int XR, typename T, int NT, bool kPrefetchX, int RT, int W, class OnFirst, class OnLater>
__device__ inline void ring_sweep(float (&acc)[RT][NT][4], uint4 (&wring)[S][RT * 32], uint32_t (&pring)[S][RT * 16],
                                  uint4 (*xring)[XR > 0 ? XR * 8 : 1], int nt, int rts, int warp, int lane,
                                  const int32_t* qtile, size_t rt_q, const T* sc, const T* zp, size_t rt_p,
                                  const uint32_t* xb,
                                  const int (&xo)[NT], const T* x, int M, int K, const GroupIndex& gi, int pstep,
                                  int g, int tig, OnFirst on_first, OnLater on_later) {
  static_assert(XR == 0 || (XR % 4 == 0 && XR <= 8 * NT && XR > 8 * (NT - 1)), "the x ring holds the kernel's rows");
  // Requests advance with running pointers and offsets (no index arithmetic per tile; pstep: see
  // ring_pstep). The sweep is unrolled over the ring (twice for an odd S), so every slot address is a
  // constant offset.
  // lanes 4 rt + (0-1): row tile rt's 16 scales, 4 rt + (2-3): its 16 zeros (32 bytes each)
  const T* pbase = (RT == 1 ? lane : lane & 3) < 2 ? sc : zp;
  const bool pcopy = lane < 4 * RT && pbase != nullptr;
  if (pcopy) pbase += (lane >> 2) * rt_p + (lane & 1) * 8 + gi.of(warp * 64) * 16;
  const int32_t* qn = qtile + static_cast<size_t>(warp) * 32 * 4;
  int jn = 0;
  // x ring: lane (rows xm + 4 i, chunk xc) copies 16 bytes of a tile's columns of each of its rows r to
  // chunk xc ^ (r % 8) of row r; xr points at row xm of the next tile, the other rows are 4 i K further.
  const int xm = lane >> 3, xc = lane & 7;
  const T* xr = XR > 0 ? x + static_cast<size_t>(xm) * K + warp * 64 + xc * 8 : nullptr;
  auto issue = [&](int sn) {
    if (jn < nt) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) cp_async16(&wring[sn][rt * 32 + lane], qn + rt * rt_q, true);
      if (pcopy) cp_async16(&pring[sn][lane * 4], pbase, true);
      if constexpr (XR > 0) {
#pragma unroll
        for (int i = 0; i < XR / 4; ++i) {
          const int r = xm + 4 * i;
          if (r < M) cp_async16(&xring[sn][r * 8 + (xc ^ (r & 7))], xr + static_cast<size_t>(4 * i) * K, true);
        }
      }
    }
    cp_commit();  // an empty group past the end keeps the count of pending groups uniform
    ++jn;
    qn += W * 32 * 4;
    pbase += pstep;
    if constexpr (XR > 0) xr += W * 64;
  };
  const uint32_t* xn[NT];  // this lane's pairs of x at the next tile to fetch, per batch block
#pragma unroll
  for (int t = 0; t < NT; ++t) xn[t] = xb + xo[t] + warp * 32;
  auto load_x = [&](Chunk<T, 4, NT, 1, kPrefetchX>& c) {
    if constexpr (kPrefetchX && XR == 0) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int step = 0; step < 4; ++step)
          x_fragment<true>(c.xb[0][step][t][0], c.xb[0][step][t][1], xn[t], step, 0, tig, K);
        xn[t] += W * 32;
      }
    }
  };
  const bool hz = zp != nullptr;
  // Row tile rt's weights, scales and zeros of slot `slot` into c.
  auto fill = [&](Chunk<T, 4, NT, 1, kPrefetchX>& c, int slot, int rt) {
    const uint4 w = wring[slot][rt * 32 + lane];
    c.w[0][0] = w.x; c.w[0][1] = w.y; c.w[0][2] = w.z; c.w[0][3] = w.w;
    const unsigned short* ps = reinterpret_cast<const unsigned short*>(pring[slot]) + rt * 32;
    c.s[0][0][0] = ps[g];
    c.s[0][0][1] = ps[g + 8];
    if (hz) {
      c.z[0][0][0] = ps[16 + g];
      c.z[0][0][1] = ps[24 + g];
    }
  };
  // Tile j from slot `slot` into cur (x fragments already there), the next tile's x into nxt, the math.
  auto step = [&](int j, int slot, Chunk<T, 4, NT, 1, kPrefetchX>& cur, Chunk<T, 4, NT, 1, kPrefetchX>& nxt) {
    issue(slot == 0 ? S - 1 : slot - 1);  // tile j + S - 1
    cp_wait<S - 1>();
    __syncwarp();
    fill(cur, slot, 0);
    if constexpr (XR > 0) {
      // Lane l addresses row 8 t + l % 8 (row 0 past M) of matrix l / 8: columns 8 (l / 8) (+ 32 for steps 2-3).
      const int q = lane >> 3;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const int r = t * 8 + (lane & 7), m = r < M ? r : 0, sw = m & 7;
        uint32_t b[4];
        ldmatrix_x4(b, &xring[slot][m * 8 + (q ^ sw)]);
        cur.xb[0][0][t][0] = b[0]; cur.xb[0][0][t][1] = b[1]; cur.xb[0][1][t][0] = b[2]; cur.xb[0][1][t][1] = b[3];
        ldmatrix_x4(b, &xring[slot][m * 8 + ((q + 4) ^ sw)]);
        cur.xb[0][2][t][0] = b[0]; cur.xb[0][2][t][1] = b[1]; cur.xb[0][3][t][0] = b[2]; cur.xb[0][3][t][1] = b[3];
      }
    }
    if (j + 1 < nt) load_x(nxt);
    const int kt = warp + j * W;
    compute_chunk<true>(acc[0], cur, kt, kt + 1, xb, xo, K, hz, true, tig);
#pragma unroll
    for (int rt = 1; rt < RT; ++rt) {  // the same x fragments (copied registers, not reloads)
      if (rt >= rts) break;  // a block of one row tile (the slot's second tile repeats the first)
      Chunk<T, 4, NT, 1, kPrefetchX> c = cur;
      fill(c, slot, rt);
      compute_chunk<true>(acc[rt], c, kt, kt + 1, xb, xo, K, hz, true, tig);
    }
    __syncwarp();  // every lane has read the slot before tile j + S refills it
  };
#pragma unroll
  for (int j = 0; j < S - 1; ++j) issue(j);
  on_first();
  // M 9-16 (NT = 2): at the top as before session 48. Inside the sweep it took their lean forms 117 -> 126 registers
  // and alpha 0 1-4 % slower (session 49, H200), while their alpha 1 gained nothing. A warp of fewer than 3 tiles
  // stages at the top too: after its first tile little or nothing is left to hide the staging behind (SmolLM2's
  // K = 576 at 12 warps is one tile a warp: 1 % alpha 1 4-8 % slower there, session 51, H200).
  constexpr bool kLaterInSweep = NT == 1;
  constexpr int kLaterMinTiles = 3;
  const bool later = kLaterInSweep && nt >= kLaterMinTiles;
  if (!later) on_later();
  Chunk<T, 4, NT, 1, kPrefetchX> ca, cb;  // used in turn (no register copies of the x fragments)
  if (nt > 0) load_x(ca);
  constexpr int kUnroll = S % 2 == 0 ? S : 2 * S;  // even, so tile j's chunk is fixed by u's parity
  for (int j0 = 0; j0 < nt; j0 += kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; u += 2) {
      if (j0 + u >= nt) break;
      step(j0 + u, u % S, ca, cb);
      if (later && u == 0 && j0 == 0) on_later();
      if (j0 + u + 1 >= nt) break;
      step(j0 + u + 1, (u + 1) % S, cb, ca);
    }
  }
}

template <int NT> using V1Default = V1Cfg<NT == 1 ? 2 : 1, NT <= 2, 2>;

// The configurations of the default table at M <= 16 (v1.cu g_v1_table), named: the configuration files and the norm
// forms (v1_norms.cu) instantiate the same types.
using V1Cfg10 = V1Cfg<1, true, 2, 4, 16>;
using V1Cfg12 = V1Cfg<1, true, 2, 3, 16, 2>;
using V1Cfg16 = V1Cfg<1, true, 2, 4, 4, 1, true>;
using V1Cfg18 = V1Cfg<1, true, 2, 4, 8, 1, false, false, 12>;
using V1Cfg20 = V1Cfg<1, true, 1, 4, 8, 2, false, false, 16>;
using V1Cfg22 = V1Cfg<1, true, 1, 3, 16, 2, false, false, 16>;
using V1Cfg24 = V1Cfg<1, true, 3, 3, 8, 2>;
using V1Cfg25 = V1Cfg<1, true, 3, 3, 4, 2>;

// kCut (two-row-tile lean forms at M <= 16 only): blocks from op.pairs on hold one row tile (the launcher cut the
// last wave's work, v1_row_pairs). A template flag so that launches without the cut run the code without its checks:
// as a run-time switch they cost the uncut shapes 1-3 % (H200, 2026-11-30, benchmarks/NOTES-kernels.md).
// kNorm: the RMSNorm epilogues (libortho.norms) compiled in, M <= 16 only, with NormOperands as the kernel's
// parameters. Their own instantiations (v1_norms.cu) and parameter type, so that the kernels without them are the
// code they were (ptxas: the norm code, and the norm fields in Operands, made some 3-block forms spill).
template <bool kNorm>
using V1Operands = std::conditional_t<kNorm, NormOperands, Operands>;  // the norm forms' parameters (kernels.h)
__device__ inline NormFields norm_fields(const Operands&) { return {}; }  // kernels without the norm epilogues
__device__ inline NormFields norm_fields(const NormOperands& op) { return op.norm; }

template <typename T, int BITS, int NT, class Cfg = V1Default<NT>, bool kCut = false, bool kNorm = false>
__global__ void __launch_bounds__(Cfg::kBlockWarps * 32, Cfg::kMinBlocks)
fused_small_m_kernel(V1Operands<kNorm> op, const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                     int M) {
  constexpr int W = Cfg::kBlockWarps;         // warps per block
  static_assert(W == kWarps || Cfg::kLean, "other warp counts: lean kernels only (the fallback sweep steps by kWarps)");
  constexpr int MT = NT * 8;                 // batch columns handled (padded)
  constexpr bool kPrefetchX = Cfg::kPrefetchX;  // activation fragments travel with the chunk
  constexpr int kU = Cfg::kU;                // K tiles per chunk; two chunks in flight (double buffer)
  // ortho entries a block stages in shared memory (rest: global); half with the x ring (configuration 8:
  // the 48 KB static limit; 9-10: less shared memory per block)
  constexpr int kStage = NT >= 8 || Cfg::kXRows > 0 ? 1024 : 2048;
  constexpr int kStageW = kStage / W & ~1;  // per warp (even: values are staged in pairs)
  constexpr int RT = Cfg::kRowTiles, R = 16 * RT;  // row tiles and output rows of a block
  // per-warp partial sums (base, then + alpha * ortho): static, or each warp's x ring after its sweep (kRedInRing)
  __shared__ float red[Cfg::kRedInRing ? 1 : W][R][MT + 1];
  auto sum_at = [&](int w, int r, int c) -> float& {
    if constexpr (Cfg::kRedInRing) {
      extern __shared__ __align__(16) uint4 v1_ring[];
      // warp w's x ring (the dynamic layout below puts the x rings first)
      return reinterpret_cast<float*>(v1_ring + w * Cfg::kStages * Cfg::kXRows * 8)[r * (MT + 1) + c];
    } else {
      return red[w][r][c];
    }
  };
  __shared__ int rpw[W][R + 1];        // the block's row pointers, one copy per warp
  __shared__ int wmeta[W][3];           // the block's entry range and the warp's first staged entry
  __shared__ uint32_t st_col[W][kStageW];      // staged column indices (int16 pairs or int32)
  __shared__ uint32_t st_val[W][kStageW / 2];  // staged values (pairs)

  static_assert(!kCut || (RT == 2 && Cfg::kLean && NT <= 2), "the cut is for two-row-tile lean forms at M <= 16");
  // The block's first row tile and row (kCut: pairs up to op.pairs, single tiles after them).
  const int b = blockIdx.x;
  const bool single = kCut && b >= op.pairs;
  const int tn = single ? op.pairs + b : RT * b, n0 = tn * 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int K = op.K, N = op.N, G = (op.K + op.group_size - 1) / op.group_size;
  const int Tk = (K + 63) >> 6;
  // Row tiles of this block (RT = 2: 1 for a single or at the end of N, where the second tile's weights repeat the
  // first's). kCut: rows from Rb on are not read from the ortho stream nor stored, and the repeat is not computed.
  const int rts = RT == 1 ? 1 : min(single ? 1 : RT, (N + 15) / 16 - tn), Rb = kCut ? 16 * rts : R;
  const size_t rt_q = rts > 1 ? static_cast<size_t>(Tk) * 32 * BITS : 0, rt_p = rts > 1 ? static_cast<size_t>(G) * 16 : 0;
  const int32_t* qtile = op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS + lane * BITS;
  const T* sc = static_cast<const T*>(op.scales) + static_cast<size_t>(tn) * G * 16;
  const T* zp = static_cast<const T*>(op.zeros);
  if (zp) zp += static_cast<size_t>(tn) * G * 16;
  // kPdlFirstTiles: the tiles every warp requests first (its ring's S - 1, or two chunks without a ring)
  constexpr int kFirstTiles = W * (Cfg::kStages > 0 ? Cfg::kStages - 1 : 2 * Cfg::kU);
  if (op.pdl)
    pdl_prologue(op.pdl, op.qweight + static_cast<size_t>(tn) * Tk * 32 * BITS, Tk * 32 * BITS * 4, rts,
                 kFirstTiles * 32 * BITS * 4);

  // The ortho stream (skipped entirely when alpha == 0, the kill switch). The tile's entries are
  // flattened and cut into equal contiguous runs, one per thread, whatever the row lengths (a dense
  // row costs its tile no more than the same count spread over rows). Their columns and values (the
  // first kStage of the block) are copied to shared memory by cp.async once the weight loads are in flight
  // (the ring: after its first tile): no registers held through the main loop, no load left to wait for
  // after it. Nothing before that waits on a row pointer (the staging reads the range, see stage_ortho).
  const bool ortho = op.alpha != 0.f && op.nnz > 0;
  int my_rp = 0, my_rp_end = 0;  // row pointers n0 + lane (lanes 0..R) and, for R = 32, n0 + 32 (lane 0)
  const bool csr_aligned = (reinterpret_cast<uintptr_t>(op.col_idx) | reinterpret_cast<uintptr_t>(op.values)) % 4 == 0;
  if (ortho && lane <= R) my_rp = op.row_ptr[min(n0 + (kCut ? min(lane, Rb) : lane), N)];  // each warp keeps its own copy
  if (R > 16 && ortho && lane == 0) my_rp_end = op.row_ptr[min(n0 + Rb, N)];
  bool staged = !ortho;
  // The block's entries [e_lo, e_hi) cut into equal contiguous runs, one per thread: the run length.
  auto run_len = [](int e_lo, int e_hi) { return (e_hi - e_lo + W * 32 - 1) / (W * 32); };
  auto stage_ortho = [&]() {
    // The block's entry range is taken here, after the weight loads: as block-uniform loads at the top, the
    // values went to uniform registers right away (R2UR), a move that waited for the loads before any weight
    // load was issued (ncu: 40 stall samples there at alpha = 1). It comes from the lanes' row pointers loaded
    // at the top, by shuffles (no loads; the ring calls this after its first tile, when they have landed):
    // staging before that tile, with loads of its own, held each warp's latency-bound sweep back by one memory
    // latency (0.8-1.1 us at M = 1 on configurations 18, 20 and 25 in session 47's probes; moved in session 48).
    // What the ortho runs need after the sweep goes to shared memory, not registers held through it.
    const int e_lo = __shfl_sync(0xffffffffu, my_rp, 0);
    const int e_hi = R > 16 ? __shfl_sync(0xffffffffu, my_rp_end, 0) : __shfl_sync(0xffffffffu, my_rp, 16);
    const int per = run_len(e_lo, e_hi);
    // The warp's entries (its threads' runs), 4-byte copies from an even entry by its own lanes; the last
    // word of an odd-length array is read half.
    const int wb = min(e_lo + warp * 32 * per, e_hi), we = min(wb + 32 * per, e_hi);
    const int st_base = wb & ~1;
    const int st_n = csr_aligned ? min(we - st_base, kStageW) : 0;
    if (lane == 0) wmeta[warp][0] = e_lo, wmeta[warp][1] = e_hi, wmeta[warp][2] = st_base;
    // Columns, then values, each word w at 4 w bytes from the warp's first entry (one loop over both with
    // the choice made per word cost ~45 instructions a word, ncu 2026-11-29). A word of 2-byte elements
    // holds entries st_base + 2 w and + 1; the second is past the array for the last word of an odd count.
    const int cw = op.col16 ? (st_n + 1) / 2 : st_n, vw = (st_n + 1) / 2;
    const char* cbase = static_cast<const char*>(op.col_idx) + static_cast<size_t>(st_base) * (op.col16 ? 2 : 4);
    const char* vbase = static_cast<const char*>(op.values) + static_cast<size_t>(st_base) * 2;
    const int half = op.nnz - 1 - st_base;  // words from 2 w >= half hold one 2-byte element
    for (int w = lane; w < cw; w += 32)
      cp_async4_part(&st_col[warp][w], cbase + 4 * w, op.col16 && 2 * w >= half ? 2 : 4);
    for (int w = lane; w < vw; w += 32) cp_async4_part(&st_val[warp][w], vbase + 4 * w, 2 * w >= half ? 2 : 4);
    cp_commit();
    staged = true;
  };
  // alpha * this thread's run [run_b, run_e) of the block's entries into the warp's red slot. Per-row loops
  // sized to M (1, 2, 4, 8 within the kernel's MT): loops over all MT padded rows cost ~200 instructions per
  // entry at M = 1 (ncu, 4096x4096, 1 %).
  auto ortho_runs = [&](int run_b, int run_e, auto entry_col, auto entry_val) {
    auto run = [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      // xt is laid out for this MR (the binding picks ld by the same rule) or not given
      const T* xt = op.xt != nullptr && op.xt_ld == MR ? static_cast<const T*>(op.xt) : nullptr;
      ortho_run<MR, R>(&sum_at(warp, 0, 0), MT + 1, rpw[warp], run_b, run_e, x, K, M, op.alpha, entry_col, entry_val, xt);
    };
    if constexpr (MT == 8) {
      if (M == 1) run(std::integral_constant<int, 1>{});
      else if (M <= 2) run(std::integral_constant<int, 2>{});
      else if (M <= 4) run(std::integral_constant<int, 4>{});
      else run(std::integral_constant<int, 8>{});
    } else {
      run(std::integral_constant<int, MT>{});
    }
  };
  // kOrthoFirst: the warp's red slot zeroed, its row pointers, its runs from global memory (nothing staged).
  bool ortho_done = false;
  auto ortho_first = [&]() {
    for (int i = lane; i < R * (MT + 1); i += 32) (&sum_at(warp, 0, 0))[i] = 0.f;
    if (lane <= R) rpw[warp][lane] = my_rp;
    if (R > 16 && lane == 0) rpw[warp][R] = my_rp_end;
    __syncwarp();
    const int e_lo = rpw[warp][0], e_hi = rpw[warp][R];
    const int per = run_len(e_lo, e_hi);
    const int run_b = min(e_lo + static_cast<int>(threadIdx.x) * per, e_hi), run_e = min(run_b + per, e_hi);
    ortho_runs(run_b, run_e, [&](int e) { return col_at(op, e); },
               [&](int e) { return Num<T>::f(static_cast<const T*>(op.values)[e]); });
    __syncwarp();
    ortho_done = staged = true;
  };
  // rms (part without a residual): r = rsqrt(sum(part) / K + eps) of each batch row from the producer's sums of
  // squares (K / 16 per row, L2 hits: the kernel before wrote them). Every warp sums a slice of the columns for every
  // row into rms_part (loads issued together, not one chain), and the epilogue adds the W slices (rms_of): while the
  // ring's first tiles are in flight (on_first, kRmsEarly) or after the block's barrier (then a second one). Nothing
  // held through the sweep.
  // (Session 38: warp 0 alone walking K / 16 columns in a chain of L2 loads cost 1-4 us a call.)
  const NormFields nf = norm_fields(op);
  constexpr bool kNorms = kNorm && NT <= 2;  // M <= 16 (the binding's limit): the other kernels compile none of it
  const bool rms = kNorms && nf.part != nullptr && nf.residual == nullptr;
  // Early in the lean forms (their ring always runs); the full forms after the barrier: there the code in the ring's
  // prologue made the 3-block forms spill (ptxas, benchmarks/ptxas_compare.py). Their norm forms (the fallback where
  // the ring cannot take a call) spill 188 / 324 bytes against 72 / 76 before session 38 wherever r is computed.
  constexpr bool kRmsEarly = Cfg::kLean;
  constexpr int MR = kNorms ? 8 * NT : 1;  // batch rows the norm code handles
  __shared__ float rms_part[kNorms ? W : 1][MR];
  auto rms_rows = [&]() {
    const int kp = K >> 4;
    float s[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) s[m] = 0.f;
    for (int c = warp * 32 + lane; c < kp; c += W * 32) {
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < M) s[m] += nf.part[static_cast<size_t>(m) * kp + c];
    }
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m >= M) break;  // block-uniform
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s[m] += __shfl_xor_sync(0xffffffffu, s[m], o);
      if (lane == 0) rms_part[warp][m] = s[m];
    }
  };
  auto rms_of = [&](int m) {  // after the block's barrier
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < (kNorms ? W : 1); ++w) s += rms_part[w][m];
    return rsqrtf(s / static_cast<float>(K) + nf.rms_eps);
  };
  if (kNorms && nf.residual != nullptr && threadIdx.x <= M) {
    // add-norm: the residual rows and norm weights the epilogue reads (written layers ago, likely out of L2) on their
    // way to L2 now, so that the epilogue's loads after the sweep hit it (threads 0..M-1: residual row m; M: weights).
    const T* p = threadIdx.x < M ? static_cast<const T*>(nf.residual) + static_cast<size_t>(threadIdx.x) * N
                                 : static_cast<const T*>(nf.norm_weight);
    prefetch_l2(p + n0);
    prefetch_l2(p + min(n0 + R, N) - 1);
  }
  float acc[RT][NT][4];
  // This lane's rows of x (batch rows t*8 + g; past M: row 0) as offsets, in 32-bit pairs, from xb.
  const uint32_t* xb = reinterpret_cast<const uint32_t*>(x) + tig;
  int xo[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) acc[rt][t][0] = acc[rt][t][1] = acc[rt][t][2] = acc[rt][t][3] = 0.f;
    xo[t] = (t * 8 + g < M ? t * 8 + g : 0) * (K >> 1);
  }

  // Each warp sweeps the full K tiles warp, warp + kWarps, ... in chunks of kU tiles, loading the next
  // chunk while it computes the current one (two register buffers, used in turn); a short last tile
  // (K % 64 != 0) comes after the sweep, so the sweep needs no bounds checks.
  constexpr int stride = kWarps * kU;
  Chunk<T, BITS, NT, kU, kPrefetchX> ca, cb;
  const bool hz = zp != nullptr;
  const GroupIndex gi(op.group_size, K);
  const int Tf = K >> 6;
  bool swept = false;
  if constexpr (Cfg::kStages > 0 && BITS == 4) {
    constexpr int XR = Cfg::kXRows, S = Cfg::kStages;
    using WSlots = uint4[S][RT * 32];
    using PSlots = uint32_t[S][RT * 16];
    using XSlots = uint4[S][XR > 0 ? XR * 8 : 1];
    WSlots* wring;
    PSlots* pring;
    XSlots* xring;
    if constexpr (Cfg::kDynRing) {  // kRingBytes of dynamic shared memory: x, weights, scales and zeros
      extern __shared__ __align__(16) uint4 v1_ring[];
      xring = reinterpret_cast<XSlots*>(v1_ring);
      wring = reinterpret_cast<WSlots*>(v1_ring + W * S * XR * 8);
      pring = reinterpret_cast<PSlots*>(v1_ring + W * S * (XR * 8 + RT * 32));
    } else {
      __shared__ __align__(16) uint4 wring_s[W][S][RT * 32];
      __shared__ __align__(16) uint32_t pring_s[W][S][RT * 16];
      __shared__ __align__(16) uint4 xring_s[W][S][XR > 0 ? XR * 8 : 1];
      wring = wring_s;
      pring = pring_s;
      xring = xring_s;
    }
    const int pstep = ring_pstep<W>(gi);
    const bool x_ok = XR == 0 || (M <= XR && K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0);
    if (Cfg::kLean || (gi.same && pstep >= 0 && x_ok)) {
      const int nt = warp < Tf ? (Tf - warp + W - 1) / W : 0;
      ring_sweep<S, XR, T, NT, kPrefetchX, RT, W>(acc, wring[warp], pring[warp], xring[warp], nt, kCut ? rts : RT, warp, lane,
                                               qtile, rt_q, sc, zp, rt_p, xb, xo, x, M, K, gi, pstep, g, tig,
                                               [&] {
                                                 if constexpr (Cfg::kOrthoFirst) {
                                                   if (ortho) ortho_first();
                                                 }
                                                 if constexpr (kRmsEarly) {
                                                   if (rms) rms_rows();
                                                 }
                                               },
                                               [&] {
                                                 if constexpr (!Cfg::kOrthoFirst) {
                                                   if (!staged) stage_ortho();
                                                 }
                                               });
      swept = true;
    }
  }
  // Without the ring (or for a short last tile) a block's row tiles are swept one after the other.
#pragma unroll
  for (int rt = 0; rt < (Cfg::kLean ? 0 : RT); ++rt) {
    const int32_t* qt = qtile + rt * rt_q;
    const T* st = sc + rt * rt_p;
    const T* zt = zp ? zp + rt * rt_p : zp;
    if (!swept && warp < Tf) load_chunk<true>(ca, warp, Tf, qt, st, zt, xb, xo, K, gi, g, tig);
    for (int kt0 = warp; !swept && kt0 < Tf; kt0 += 2 * stride) {
      if (kt0 + stride < Tf) load_chunk<true>(cb, kt0 + stride, Tf, qt, st, zt, xb, xo, K, gi, g, tig);
      if (!staged) stage_ortho();
      compute_chunk<true>(acc[rt], ca, kt0, Tf, xb, xo, K, hz, gi.same, tig);
      if (kt0 + stride >= Tf) break;
      if (kt0 + 2 * stride < Tf) load_chunk<true>(ca, kt0 + 2 * stride, Tf, qt, st, zt, xb, xo, K, gi, g, tig);
      compute_chunk<true>(acc[rt], cb, kt0 + stride, Tf, xb, xo, K, hz, gi.same, tig);
    }
    if (Tf < Tk && warp == Tf % kWarps) {
      Chunk<T, BITS, NT, 1, kPrefetchX> ct;
      load_chunk<false>(ct, Tf, Tk, qt, st, zt, xb, xo, K, gi, g, tig);
      compute_chunk<false>(acc[rt], ct, Tf, Tk, xb, xo, K, hz, gi.same, tig);
    }
  }

  // C fragment: c0,c1 -> row g, batch columns 2*tig, 2*tig+1; c2,c3 -> row g+8. Added to the ortho sums
  // when they came first, else stored.
  const bool base_adds = Cfg::kOrthoFirst && (Cfg::kLean ? ortho : ortho_done);  // lean: the ring ran them
  auto put = [&](float& slot, float v) { slot = base_adds ? slot + v : v; };
  if constexpr (Cfg::kRedInRing) __syncwarp();  // every lane's last reads of the ring are done before it holds sums
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      put(sum_at(warp, rt * 16 + g, t * 8 + 2 * tig), acc[rt][t][0]);
      put(sum_at(warp, rt * 16 + g, t * 8 + 2 * tig + 1), acc[rt][t][1]);
      put(sum_at(warp, rt * 16 + g + 8, t * 8 + 2 * tig), acc[rt][t][2]);
      put(sum_at(warp, rt * 16 + g + 8, t * 8 + 2 * tig + 1), acc[rt][t][3]);
    }
  }
  if (!Cfg::kLean && !staged) stage_ortho();  // a warp without K tiles (the ring stages them for every warp)
  if (ortho && !base_adds) {
    // The warp adds alpha times its threads' runs into its own red slot, as soon as its sweep is done.
    if (lane <= R) rpw[warp][lane] = my_rp;
    if (R > 16 && lane == 0) rpw[warp][R] = my_rp_end;
    cp_wait<0>();
    __syncwarp();
    const int e_lo = wmeta[warp][0], e_hi = wmeta[warp][1], st_base = wmeta[warp][2];
    const int per = run_len(e_lo, e_hi);
    const int run_b = min(e_lo + static_cast<int>(threadIdx.x) * per, e_hi), run_e = min(run_b + per, e_hi);
    const int st_n = csr_aligned ? min(min(e_lo + (warp + 1) * 32 * per, e_hi) - st_base, kStageW) : 0;
    auto entry_col = [&](int e) {
      const int i = e - st_base;
      if (i >= st_n) return col_at(op, e);
      return op.col16 ? static_cast<int>(reinterpret_cast<const int16_t*>(st_col[warp])[i])
                      : static_cast<int>(st_col[warp][i]);
    };
    auto entry_val = [&](int e) {
      const int i = e - st_base;
      return Num<T>::f(i < st_n ? reinterpret_cast<const T*>(st_val[warp])[i] : static_cast<const T*>(op.values)[e]);
    };
    ortho_runs(run_b, run_e, entry_col, entry_val);
  }
  // add-norm: this thread's first residual and weight (the epilogue's i = threadIdx.x), loaded before the barrier
  float res0 = 0.f, g0 = 0.f;
  if (kNorms && nf.residual != nullptr && threadIdx.x < R * M) {
    const int r = threadIdx.x & (R - 1), m = threadIdx.x >> (RT == 1 ? 4 : 5), n = n0 + r;
    if (n < N && !(kCut && r >= Rb)) {
      res0 = Num<T>::f(static_cast<const T*>(nf.residual)[static_cast<size_t>(m) * N + n]);
      g0 = Num<T>::f(static_cast<const T*>(nf.norm_weight)[n]);
    }
  }
  if (op.pdl & kPdlLate) pdl_trigger();  // the dependents' launch overlaps the reduction and the stores
  __syncthreads();
  if (rms && !kRmsEarly) {  // (else the ring's on_first computed them)
    rms_rows();
    __syncthreads();
  }
  if (op.glu) {
    // Each 16-row tile: 8 gate rows, then their 8 up rows (libortho.glu); out is (M, N / 2). transformers' eager
    // act_fn(gate_proj(x)) * up_proj(x), each step rounded to T.
    constexpr int H = R / 2;  // outputs of the block per batch row
    for (int i = threadIdx.x; i < H * M; i += blockDim.x) {
      const int h = i & (H - 1), m = i / H, rg = (h >> 3) * 16 + (h & 7), n = n0 + rg;
      if (n >= N || (kCut && rg >= Rb)) continue;
      float yg = 0.f, yu = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) yg += sum_at(w, rg, m), yu += sum_at(w, rg + 8, m);
      if (rms) {
        const float r = rms_of(m);
        yg *= r, yu *= r;
      }
      if (bias) yg += Num<T>::f(bias[n]), yu += Num<T>::f(bias[n + 8]);
      const float g = Num<T>::f(Num<T>::from(yg)), u = Num<T>::f(Num<T>::from(yu));
      const float a = Num<T>::f(Num<T>::from(g / (1.f + expf(-g))));
      out[static_cast<size_t>(m) * (N / 2) + n0 / 2 + h] = Num<T>::from(a * u);
    }
    return;
  }
  if (kNorms && nf.residual != nullptr) {
    // add-norm: h = residual + y and g * h (eager's roundings), and h's sum of squares over each 16-row tile, reduced
    // over the 16 consecutive threads of the tile (R * M and blockDim are multiples of 16: a half-warp is all in).
    const T* res = static_cast<const T*>(nf.residual);
    const T* gw = static_cast<const T*>(nf.norm_weight);
    T* out2 = static_cast<T*>(nf.out2);
    for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
      const int r = i & (R - 1), m = i >> (RT == 1 ? 4 : 5), n = n0 + r;
      const bool live = n < N && !(kCut && r >= Rb);
      float h = 0.f;
      if (live) {
        float y = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) y += sum_at(w, r, m);
        if (bias) y += Num<T>::f(bias[n]);
        const size_t o = static_cast<size_t>(m) * N + n;
        const bool first = i == static_cast<int>(threadIdx.x);
        h = Num<T>::f(Num<T>::from(Num<T>::f(Num<T>::from(y)) + (first ? res0 : Num<T>::f(res[o]))));
        out[o] = Num<T>::from(h);
        out2[o] = Num<T>::from((first ? g0 : Num<T>::f(gw[n])) * h);
      }
      float ss = h * h;
      const unsigned half = 0xffffu << (lane & 16);
#pragma unroll
      for (int s2 = 8; s2 > 0; s2 >>= 1) ss += __shfl_xor_sync(half, ss, s2);
      if ((r & 15) == 0 && live) nf.part[static_cast<size_t>(m) * (N >> 4) + (n >> 4)] = ss;
    }
    return;
  }
  for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
    const int r = i & (R - 1), m = i >> (RT == 1 ? 4 : 5), n = n0 + r;
    if (n >= N || (kCut && r >= Rb)) continue;
    float y = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) y += sum_at(w, r, m);
    if (rms) y *= rms_of(m);
    if (bias) y += Num<T>::f(bias[n]);
    out[static_cast<size_t>(m) * N + n] = Num<T>::from(y);
  }
}

template <typename T, class Ops>
cudaError_t launch_v1(void (*kernel)(Ops, const T*, const T*, T*, int), const Ops& op, const void* x,
                      const void* bias, void* out, int M, cudaStream_t s, int smem = 0, int rows = 16,
                      int warps = kWarps, int blocks = 0) {
  const dim3 grid(blocks > 0 ? blocks : (op.N + rows - 1) / rows), block(warps * 32);
  auto xp = static_cast<const T*>(x);
  auto bp = static_cast<const T*>(bias);
  auto op_ = static_cast<T*>(out);
  return launch_maybe_pdl(kernel, grid, block, smem, s, op.pdl != 0, op, xp, bp, op_, M);
}

// Two-row-tile blocks (RT = 2): how many hold two tiles (op.pairs; the rest one) and the grid. At M <= 16 an SM's
// blocks take about as long per row tile however many it runs, so a launch ends with the SMs that got the most tiles
// (2026-11-30 timeline: 22016x4096's SMs with 6 blocks end 2 us after those with 5). When cutting the last wave's work
// into single tiles lowers that most (ceil(tiles / SMs) against 2 ceil(pairs / SMs)) and v1_row_pairs_split() is on,
// whole waves of pairs come first and the rest follow as single tiles; else every block holds two (the last one may
// hold one, at the end of N).
inline void v1_row_pairs(int tiles, int sms, bool split, int& pairs, int& blocks) {
  pairs = blocks = (tiles + 1) / 2;
  if (!split || sms <= 0 || (tiles + sms - 1) / sms >= 2 * ((pairs + sms - 1) / sms)) return;
  pairs = sms * (tiles / (2 * sms));
  blocks = pairs + (tiles - 2 * pairs);
}

// One configuration's kernel (kCut or not) on a grid of `blocks` (0: one per 16 * kRowTiles rows). A ring in
// dynamic shared memory: the kernel is allowed its kRingBytes (over the default 48 KB) once per device first.
template <typename T, int NT, class Cfg, bool kCut, bool kNorm = false>
cudaError_t launch_v1_kernel(const V1Operands<kNorm>& op, const void* x, const void* bias, void* out, int M,
                             cudaStream_t s, int blocks) {
  constexpr auto kernel = fused_small_m_kernel<T, 4, NT, Cfg, kCut, kNorm>;
  if constexpr (Cfg::kDynRing) {
    static bool allowed[64] = {};
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev < 0 || dev >= 64) return cudaErrorInvalidDevice;
    if (!allowed[dev]) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kRingBytes);
      if (err != cudaSuccess) return err;
      allowed[dev] = true;
    }
  }
  return launch_v1<T>(kernel, op, x, bias, out, M, s, Cfg::kRingBytes, 16 * Cfg::kRowTiles, Cfg::kBlockWarps, blocks);
}

// Whether a call meets what the ring needs for the whole of it, on the host from the kernel's own checks
// (GroupIndex::same, ring_pstep, x rows at 16-byte alignment), plus whole 64-column tiles.
template <class Cfg>
bool v1_lean_ok(const Operands& op, const void* x, int M) {
  const GroupIndex gi(op.group_size, op.K);
  const bool groups = gi.same && ring_pstep<Cfg::kBlockWarps>(gi) >= 0;
  const bool x_ok = Cfg::kXRows == 0 || (M <= Cfg::kXRows && reinterpret_cast<uintptr_t>(x) % 16 == 0);
  return op.bits == 4 && op.K % 64 == 0 && groups && x_ok;
}

template <typename T, int NT, class Cfg, bool kNorm = false>
cudaError_t launch_v1_one(const V1Operands<kNorm>& op, const void* x, const void* bias, void* out, int M,
                          cudaStream_t s) {
  // M <= 16 only: at M 24-32 (configuration 32) the cut was 0.6-0.8 % faster on 14336x4096 and 1.0-1.2 % slower on
  // 22016x4096 (H200, 2026-11-30, results/row-pairs-ab-H200-s30-m32.json).
  if constexpr (Cfg::kRowTiles == 2 && Cfg::kLean && NT <= 2) {
    const int tiles = (op.N + 15) / 16;
    V1Operands<kNorm> o = op;
    int blocks = 0;
    v1_row_pairs(tiles, device_info().sms, v1_row_pairs_split(), o.pairs, blocks);
    if (blocks != (tiles + 1) / 2) return launch_v1_kernel<T, NT, Cfg, true, kNorm>(o, x, bias, out, M, s, blocks);
  }
  return launch_v1_kernel<T, NT, Cfg, false, kNorm>(op, x, bias, out, M, s, 0);
}

// A ring configuration in its lean form where the call allows it (and v1_lean() is on), else in full (with
// other warp counts than kWarps: the same configuration with kWarps, in full).
template <typename T, int NT, class Cfg, bool kNorm = false>
cudaError_t launch_v1_ring(const V1Operands<kNorm>& op, const void* x, const void* bias, void* out, int M,
                           cudaStream_t s) {
  constexpr bool kOwnWarps = Cfg::kBlockWarps != kWarps;
  const bool lean = (kOwnWarps || !Cfg::kOrthoFirst || M <= v1_lean_ortho_first_max_m()) && v1_lean() &&
                    v1_lean_ok<Cfg>(op, x, M);
  if (!lean) return launch_v1_one<T, NT, typename Cfg::Eight, kNorm>(op, x, bias, out, M, s);
  ++v1_lean_launches();
  return launch_v1_one<T, NT, typename Cfg::Lean, kNorm>(op, x, bias, out, M, s);
}

// The largest M of each v1 configuration below (cuda.py V1_CONFIG_MAX_M mirrors it).
constexpr int kV1CfgMaxM[] = {8, 8, 8, 8, 8, 8, 16, 16, 4, 8, 16, 8, 16, 4, 8, 8, 4, 4, 8, 4, 8, 8, 16, 4, 8, 4,
                               32, 32, 32, 32, 64, 64, 32};
constexpr int kV1Cfgs = sizeof(kV1CfgMaxM) / sizeof(kV1CfgMaxM[0]);

}  // namespace

// Configurations 11 and up (v1_configs_hi.cu: another translation unit, built in parallel).
cudaError_t launch_v1_cfg_hi(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                             cudaStream_t s);
// The RMSNorm epilogues (NormOperands; M <= 16): INT4 by the table's configuration `cfg` where it has a norm
// form (v1_norms.cu), other widths by the default configuration; cudaErrorNotSupported for a configuration without
// one (the caller then takes the product and PyTorch's steps).
cudaError_t launch_v1_norm(const NormOperands& op, const void* x, const void* bias, void* out, int M, int cfg,
                           cudaStream_t s);
// Configurations 26 and up, M 17-64 (v1_configs_m32.cu).
cudaError_t launch_v1_cfg_m32(const Operands& op, const void* x, const void* bias, void* out, int M, int cfg,
                              cudaStream_t s);

}  // namespace libortho
