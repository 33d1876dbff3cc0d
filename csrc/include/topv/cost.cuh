// Cost-matrix kernels: prune's prep kernel (clears state, checks finiteness) and the cost GEMM
// with row norms and the cost formula fused in.
//
// C_ij = alpha (1 - cos(s_i, t_j)) / 2 + beta (1 - exp(-|p_i - q_j|^2 / (2 sigma^2)))
//        + gamma |p_i - c| / sqrt(0.5)
// The dot products run on tensor cores for fp16/bf16 (mma.sync m16n8k16, fp32 accumulate; the
// products of 16-bit inputs are exact in fp32) and on FMA units for fp32 inputs: TF32 would put a
// ~5e-4 relative error into C, i.e. into the exponent of the plan as dC / eps.
//
// The float32 cosine dot |s|^-1 |t|^-1 is safe while each squared norm lies in [2^-60, 2^120]: no
// square, product or sum overflows, and what flushes to zero moves the cosine by < d 2^-66. A row
// outside that range (a zero row; |x| ~ 1e19, whose square is inf in float32; tiny values whose
// squares underflow) gets the inverse norm +inf (inv_norm), and a tile holding one rewrites those
// entries from a cosine computed in double (store_exact_tile): rare, and kept out of the hot
// epilogue, which only ORs a flag.
#pragma once

#include <algorithm>

#include "topv/common.cuh"

namespace topv {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Prune's first kernel: clears the potentials and done flags and, with check_finite, flags any
// non-finite feature or position. (Row norms come from the GEMM, which has the rows in shared
// memory anyway, so unchecked calls never read the features twice.)
// ---------------------------------------------------------------------------------------------

struct CheckMat {
  const void* data;
  int64_t row_stride, rows;
};

template <typename T>
__global__ __launch_bounds__(256) void prep_kernel(CheckMat a, CheckMat b, int64_t d, bool vec, const float* pos,
                                                   int64_t pos_elems, int* nonfinite, unsigned* clear,
                                                   int64_t clear_words) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t w = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x; w < clear_words;
       w += int64_t(gridDim.x) * gridDim.y * blockDim.x)
    clear[w] = 0u;
  if (!nonfinite) return;
  const int64_t r = int64_t(blockIdx.x) * 8 + warp;
  const CheckMat M = blockIdx.y == 0 ? a : b;
  bool bad = false;
  if (blockIdx.y == 0)  // positions ride along with the first matrix, 2 floats per warp-row
    for (int64_t e = r * 2 + lane; e < r * 2 + 2 && e < pos_elems; e += 32) bad |= !isfinite(pos[e]);
  if (r < M.rows) {
    const T* x = static_cast<const T*>(M.data) + r * M.row_stride;
    if (vec) {  // 16-byte loads: d and the stride are multiples of 16 bytes, the base is aligned
      constexpr int V = 16 / sizeof(T);
      const uint4* x4 = reinterpret_cast<const uint4*>(x);
      for (int64_t k = lane; k < d / V; k += 32) {
        uint4 u = __ldg(x4 + k);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int t = 0; t < V; ++t) bad |= !isfinite(to_float(e[t]));
      }
    } else {
      for (int64_t k = lane; k < d; k += 32) bad |= !isfinite(to_float(x[k]));
    }
  }
  if (__any_sync(0xffffffffu, bad) && lane == 0) *nonfinite = 1;
}

// ---------------------------------------------------------------------------------------------
// Cost GEMM. One launch covers up to kMaxSegmentsPerLaunch independent (rows x cols) blocks of C
// (segments of a packed batch, batch elements, or row chunks of one large segment), described
// by a table passed by value. Block z of the grid is segment z (split-K: z = segment * splits + split).
// ---------------------------------------------------------------------------------------------

struct GemmSeg {
  long long s_off, t_off, c_off;  // element offsets: source row 0, target row 0, C(0, 0)
  int p_off, q_off;               // float offsets of position pair 0 (source / target)
  int rows, cols;                 // C block is rows x cols, leading dimension cols
  int id;                         // segment id for the done flags (prune's early exit)
  int sq_off;                     // split-K: packed row index of row 0 (offset into sq_s / sq_t)
};

struct GemmTable {
  GemmSeg seg[kMaxSegmentsPerLaunch];
};

struct GemmArgs {
  const void* S;
  const void* T;
  int64_t lds, ldt, d;
  const float* P;
  const float* Q;
  int64_t p_rs, q_rs;  // position row strides (floats)
  float* C;
  const int* done;  // skip segments already converged (nullptr: none)
  float half_alpha, beta, neg_inv_2s2, gamma;
  // Split-K (PARTIAL) outputs: split s writes raw dots to C + s * part_stride and the partial
  // sums of squares of rows / columns to sq_s / sq_t + s * sq_stride.
  float* sq_s;
  float* sq_t;
  long long part_stride, sq_stride;
  int splits;
  // Nullable: ready[id] += the elements of C a block stored, released at gpu scope once they are
  // all stored, so a kernel launched with programmatic dependent launch (prune's on-chip
  // Sinkhorn) can start on a segment as soon as its C is complete. PARTIAL GEMMs store no C and
  // ignore it; cost_reduce_kernel, which turns their partials into C, publishes its rows.
  int* ready;
  DType dtype;  // of S and T (the exact cosines read them)
};

// Programmatic dependent launch: a dependent grid launched with the programmatic-serialisation
// attribute may start once every block of this grid has run this. The GEMMs run it first, so by
// then every GEMM block is resident or done, and a dependent block that waits on `ready` never
// holds an SM that a GEMM block still needs.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// One thread of a block whose C stores all precede a block (or consumer) barrier: publishes the
// rows x cols elements of the tile at (row0, col0) of the segment.
__device__ __forceinline__ void signal_ready(const GemmArgs& a, const GemmSeg& sg, int row0, int col0, int bm, int bn) {
  const int cnt = (min(sg.rows, row0 + bm) - row0) * (min(sg.cols, col0 + bn) - col0);
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(a.ready + sg.id), "r"(cnt) : "memory");
}

// dot = s_i . t_j; inv_st = 1 / (|s_i| |t_j|) (0 when either is 0).
__device__ __forceinline__ float cost_value(const GemmArgs& a, const GemmSeg& sg, int i, int j, float dot,
                                           float inv_st) {
  const float* p = a.P + sg.p_off + int64_t(i) * a.p_rs;
  const float* q = a.Q + sg.q_off + int64_t(j) * a.q_rs;
  const float pr = p[0], pc = p[1];
  const float dr = pr - q[0], dc = pc - q[1];
  const float cr = pr - kCentre, cc = pc - kCentre;
  const float cosv = dot * inv_st;
  return a.half_alpha * (1.0f - cosv) + a.beta * (1.0f - __expf((dr * dr + dc * dc) * a.neg_inv_2s2)) +
         a.gamma * sqrtf(cr * cr + cc * cc) * kInvMaxCentreDist;
}

constexpr float kMinSafeSq = 0x1p-60f, kMaxSafeSq = 0x1p120f;

// The inverse norm of a row from its float32 sum of squares; +inf where the float32 cosine is not
// safe (see the top of this file). NaN (non-finite input) stays NaN: such scores are unspecified.
__device__ __forceinline__ float inv_norm(float sumsq) {
  return (sumsq >= kMinSafeSq && sumsq <= kMaxSafeSq) || sumsq != sumsq ? 1.0f / sqrtf(sumsq) : INFINITY;
}

// A tile's inverse norm of row or column i: rows past the segment (zeros, or the next segment's
// rows) are never stored and must not ask for the exact path.
__device__ __forceinline__ float tile_inv_norm(float sumsq, bool in_segment) {
  return in_segment ? inv_norm(sumsq) : 0.0f;
}

template <typename T>
__device__ float exact_cos_rows(const T* x, const T* y, int64_t d) {
  double xx = 0.0, yy = 0.0, xy = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double u = to_float(x[k]), v = to_float(y[k]);
    xx = fma(u, u, xx);
    yy = fma(v, v, yy);
    xy = fma(u, v, xy);
  }
  return xx > 0.0 && yy > 0.0 ? float(xy / (sqrt(xx) * sqrt(yy))) : 0.0f;
}

// cos(S row si, T row tj) in double, which holds the squares of every float (0 when either row is
// zero). Out of line and with plain arguments: a reference into the kernel's parameters would make
// every kernel that calls it copy its parameters to the stack.
__device__ __noinline__ float exact_cos(const void* S, const void* T, int64_t si, int64_t tj, int64_t d, DType dt) {
  switch (dt) {
    case DType::kFloat16:
      return exact_cos_rows(static_cast<const __half*>(S) + si, static_cast<const __half*>(T) + tj, d);
    case DType::kBFloat16:
      return exact_cos_rows(static_cast<const __nv_bfloat16*>(S) + si, static_cast<const __nv_bfloat16*>(T) + tj, d);
    default:
      return exact_cos_rows(static_cast<const float*>(S) + si, static_cast<const float*>(T) + tj, d);
  }
}

__device__ __forceinline__ float exact_cos(const GemmArgs& a, const GemmSeg& sg, int i, int j) {
  return exact_cos(a.S, a.T, sg.s_off + int64_t(i) * a.lds, sg.t_off + int64_t(j) * a.ldt, a.d, a.dtype);
}

// C from a dot product and inv_st = inv_norm(ss_i) * inv_norm(ss_j), taking the exact path where
// either row asks for it (one element; the tile kernels use store_exact_tile instead).
__device__ __forceinline__ float cost_checked(const GemmArgs& a, const GemmSeg& sg, int i, int j, float dot,
                                             float inv_st) {
  return isinf(inv_st) ? cost_value(a, sg, i, j, exact_cos(a, sg, i, j), 1.0f) : cost_value(a, sg, i, j, dot, inv_st);
}

// Rewrites, by threads tid, tid + nt, ..., the stored entries of the tile at (row0, col0) whose row
// or column has the inverse norm +inf (inv_rows[bm] / inv_cols[bn] of the tile) from exact_cos.
// Called after a barrier that orders it behind the tile's own stores. Arguments by value, for the
// reason given at exact_cos.
__device__ __noinline__ void store_exact_tile(const GemmArgs a, const GemmSeg sg, int row0, int col0, int bm, int bn,
                                              const float* inv_rows, const float* inv_cols, int tid, int nt) {
  for (int e = tid; e < bm * bn; e += nt) {
    const int lr = e / bn, lc = e - lr * bn, r = row0 + lr, c = col0 + lc;
    if (r < sg.rows && c < sg.cols && isinf(inv_rows[lr] * inv_cols[lc]))
      a.C[sg.c_off + int64_t(r) * sg.cols + c] = cost_value(a, sg, r, c, exact_cos(a, sg, r, c), 1.0f);
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM for 16-bit inputs (sm_80-style; plain sm_90, no wgmma/TMA).
//
// * mma.sync m16n8k16 (fp32 accumulate). Both operands are k-contiguous rows (A = S rows,
//   B = T rows), which is "row" for A and "col" for B, so ldmatrix without .trans yields both
//   fragments straight from shared memory.
// * k step BK = 64: one tile row is 128 B = 8 chunks of 16 B; chunk c of row r is stored at chunk
//   c ^ (r & 7). An ldmatrix phase reads 8 consecutive rows at one logical chunk, which lands in 8
//   distinct bank quads (conflict-free), and a cp.async row write of 8 threads is conflict-free too.
// * STAGES-deep cp.async.cg pipeline (zero-fill for rows / k beyond the segment), one
//   __syncthreads per k tile, fragments double-buffered in registers across the k16 steps and
//   across the tile boundary (the barrier sits before the last k16 step, CUTLASS-style), so
//   ldmatrix latency hides behind the previous step's mma.
// * Row norms come from the fragments already in registers (no extra shared-memory traffic, which
//   is the binding resource of mma.sync GEMMs). The warps that share A rows (same wm) or B rows
//   (same wn) must each square a different part of k, without a branch (the compiler if-converts
//   it, and predicated-off instructions still take issue slots): warp (wm, wn) walks the 4 k16
//   steps of a tile in the rotated order (p + wm + wn) % 4 and squares at compile-time positions
//   p (norm_here), which covers every step exactly once per row. The sums meet in shared memory.
// * Tiles are visited in groups of kTcGroupM tile rows (L2 reuse when one segment has many tiles,
//   e.g. 3072 x 16384 row chunks: the group's A rows stay in L2 while B streams once per group).
// ---------------------------------------------------------------------------------------------

template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MINB_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int MINB = MINB_;  // blocks per SM the config is sized for (launch bounds)
  static constexpr int BK = 64;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, NT = WARPS_M * WARPS_N * 32;
  static constexpr int STAGE_BYTES = (BM + BN) * BK * 2;
  static constexpr size_t SMEM = size_t(STAGES) * STAGE_BYTES;
};

// Configs (all BK = 64). Why these:
// * 64 x 64 warp tiles (8 ldmatrix.x4 per 32 mma) wherever possible: with mma.sync the shared
//   memory port (ldmatrix reads + cp.async writes) limits H100 long before the tensor pipes do;
//   64 x 32 warp tiles (6 per 16) cap a 128 x 128 / 8-warp block near half of the peak.
// * TcWide 128 x 256 / 8 warps / 4 stages (192 KB, 1 block per SM): the most bytes of reuse per
//   shared-memory byte; for big problems ((c): 3072 x 16384, d = 3584).
// * TcMid 128 x 192 / 6 warps / 4 stages (160 KB): 576 = 3 x 192, so n = 576 segments waste 11%
//   of their tiles instead of 23% (128 x 128) or 48% (128 x 256); B = 16: 240 tiles, 2 waves. Also
//   the split-K tile for B = 1, n = 576 (15 tiles x 8 splits = 120 blocks, one wave).
// * TcSq 128 x 128 / 4 warps / 3 stages (96 KB, 2 blocks per SM): finer granularity for wave
//   quantisation on medium problems.
// * TcSmall 64 x 64 / 4 warps (32 x 32) / 4 stages (64 KB, 3 per SM): tiny segments (n <= 64),
//   where a big tile would mostly compute padding.
// The launcher picks the config (and cost_gemm_tc_splits the split count) with a small wave /
// efficiency model, tc_model_cost below; its efficiencies are estimates to calibrate on the GPU.
using TcWide = TcCfg<128, 256, 64, 64, 4, 1>;
using TcMid = TcCfg<128, 192, 64, 64, 4, 1>;
using TcSq = TcCfg<128, 128, 64, 64, 3, 2>;
using TcSmall = TcCfg<64, 64, 32, 32, 4, 3>;

constexpr int kTcGroupM = 8;

// The segment, split, tile and k tiles [kt0, kt0 + nk) of this block: grid z = segment * splits +
// split, each split taking ceil(ktiles / splits) k tiles; tiles are visited in groups of kTcGroupM
// tile rows side by side, then the next tile column (L2 reuse of a group's A rows when one segment
// has many tiles).
struct GemmTile {
  int seg, split, tm, tn, kt0, nk;
};

__device__ __forceinline__ GemmTile gemm_tile(int splits, int ktiles) {
  GemmTile t;
  t.seg = int(blockIdx.z) / splits;
  t.split = int(blockIdx.z) - t.seg * splits;
  const int gx = int(gridDim.x), gy = int(gridDim.y);
  const int bid = int(blockIdx.y) * gx + int(blockIdx.x);
  const int group = bid / (kTcGroupM * gx), first = group * kTcGroupM;
  const int gsz = min(gy - first, kTcGroupM), in = bid - group * kTcGroupM * gx;
  t.tm = first + in % gsz;
  t.tn = in / gsz;
  const int per = (ktiles + splits - 1) / splits;
  t.kt0 = t.split * per;
  t.nk = max(0, min(per, ktiles - t.kt0));
  return t;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Whether a warp squares its fragments at k16 position p, given W warps share the rows and warp w
// of them walks the steps from rotation (wm + wn) % 4: W = 4 -> p 0; W = 2 -> p 0, 2 (rotations
// differ by 1); W = 3 -> p 0 (3 steps), plus p 1 of warp 2 (the 4th step; the only predicated case).
template <int W>
__device__ __forceinline__ bool norm_here(int p, int w) {
  static_assert(W >= 1 && W <= 4, "norm coverage is worked out for 1..4 warps");
  if constexpr (W == 1) return true;
  else if constexpr (W == 2) return (p & 1) == 0;
  else if constexpr (W == 3) return p == 0 || (p == 1 && w == 2);
  else return p == 0;
}

// s + x.lo^2 + x.hi^2 for a register holding two 16-bit values (exact widening, fp32 sum).
template <typename T>
__device__ __forceinline__ float sumsq2(uint32_t x, float s);
template <>
__device__ __forceinline__ float sumsq2<__nv_bfloat16>(uint32_t x, float s) {
  const float lo = __uint_as_float(x << 16), hi = __uint_as_float(x & 0xffff0000u);
  return fmaf(hi, hi, fmaf(lo, lo, s));
}
template <>
__device__ __forceinline__ float sumsq2<__half>(uint32_t x, float s) {
  float lo, hi;
  asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"(static_cast<unsigned short>(x & 0xffffu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"(static_cast<unsigned short>(x >> 16)));
  return fmaf(hi, hi, fmaf(lo, lo, s));
}

// PARTIAL = false: grid (col tiles, row tiles, segments); C = the cost (one split, whole k).
// PARTIAL = true: grid z = segment * a.splits + split; split s covers k tiles
// [s * kt_per, min((s + 1) * kt_per, ktiles)) and writes raw dot products to
// C + s * part_stride and the partial sums of squares to sq_s / sq_t + s * sq_stride (rows by
// the blocks of tile column 0, columns by those of tile row 0).
// VEC: 16-byte cp.async (d and strides multiples of 8 elements, aligned base); otherwise
// element-wise loads through registers into the same layout.
template <typename T, class Cfg, bool VEC, bool PARTIAL>
__global__ __launch_bounds__(Cfg::NT, Cfg::MINB) void cost_gemm_tc_kernel(GemmArgs a, GemmTable tab) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN, WM = Cfg::WM, WN = Cfg::WN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int WARPS_M = Cfg::WARPS_M, WARPS_N = Cfg::WARPS_N, NT = Cfg::NT;
  constexpr int MI = WM / 16, NI = WN / 8, KSTEPS = BK / 16;
  constexpr int ROWB = BK * 2;                      // bytes per tile row
  constexpr int RPI = NT / 8;                       // tile rows per load iteration (8 chunks a row)
  constexpr int ITERS = ((BM + BN) + RPI - 1) / RPI;
  static_assert(sizeof(T) == 2, "16-bit inputs");
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BM % WM == 0 && BN % WN == 0, "tile shape");
  static_assert(RPI % 8 == 0, "a thread's rows share one swizzle phase");
  static_assert(STAGES >= 2 && KSTEPS == 4, "pipeline shape; the norm rotation assumes 4 k16 steps");
  static_assert(size_t(WARPS_N * BM + WARPS_M * BN + BM + BN) * 4 <= Cfg::SMEM, "epilogue scratch fits");
  extern __shared__ __align__(128) unsigned char smem_raw[];

  launch_dependents();
  const auto [seg, split, tm, tn, kt0, nk] = gemm_tile(PARTIAL ? a.splits : 1, int((a.d + BK - 1) / BK));
  const GemmSeg& sg = tab.seg[seg];
  const int row0 = tm * BM, col0 = tn * BN;
  if (row0 >= sg.rows || col0 >= sg.cols) return;
  if (a.done && a.done[sg.id]) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;

  // ---- global -> shared: thread t copies chunk t & 7 of tile rows (t >> 3) + i * RPI.
  const T* S = static_cast<const T*>(a.S) + sg.s_off;
  const T* Tm = static_cast<const T*>(a.T) + sg.t_off;
  const int lrow = tid >> 3, kc = (tid & 7) * 8;
  const int a_left = sg.rows - row0 - lrow, b_left = sg.cols - col0 - lrow;  // valid iff r < left
  const bool tile_full = row0 + BM <= sg.rows && col0 + BN <= sg.cols;
  const T* gA = S + int64_t(row0 + lrow) * a.lds + kc;
  const T* gB = Tm + int64_t(col0 + lrow) * a.ldt + kc;
  // Stored chunk (tid & 7) ^ (row & 7); row & 7 == lrow & 7 for every iteration (RPI % 8 == 0).
  const uint32_t st_off = uint32_t(lrow * ROWB + ((((tid & 7) ^ (lrow & 7))) << 4));

  auto load_tile = [&](int stage, int kt) {
    unsigned char* dst0 = smem_raw + stage * Cfg::STAGE_BYTES + st_off;
    const int64_t k = int64_t(kt) * BK;
    if constexpr (VEC) {
      // Interior tiles (the common case) need no predicates; edge tiles zero-fill rows past the
      // segment and chunks past d (d % 8 == 0: a chunk is all in or all out) and hand the copy
      // a.S as its (unread) source, so it never carries an out-of-range address.
      if (tile_full && k + BK <= a.d) {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int r = i * RPI;  // tile row of this iteration, relative to lrow
          if ((i + 1) * RPI > BM + BN && lrow + r >= BM + BN) continue;  // ragged last iteration
          const bool is_a = (i + 1) * RPI <= BM ? true : (r >= BM ? false : lrow + r < BM);
          const T* src = is_a ? gA + (int64_t(r) * a.lds + k) : gB + (int64_t(r - BM) * a.ldt + k);
          cp_async16(dst0 + r * ROWB, src, true);
        }
      } else {
        const bool kok = k + kc < a.d;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
          const int r = i * RPI;
          if ((i + 1) * RPI > BM + BN && lrow + r >= BM + BN) continue;
          const bool is_a = (i + 1) * RPI <= BM ? true : (r >= BM ? false : lrow + r < BM);
          const T* src = is_a ? gA + (int64_t(r) * a.lds + k) : gB + (int64_t(r - BM) * a.ldt + k);
          const bool ok = kok && (is_a ? r < a_left : r - BM < b_left);
          cp_async16(dst0 + r * ROWB, ok ? static_cast<const void*>(src) : a.S, ok);
        }
      }
    } else {
      // d or a stride not a multiple of 8: element-wise 16-bit loads, zero past d / the rows.
      // Not unrolled: this path only has to be correct, and unrolled it spills.
#pragma unroll 1
      for (int i = 0; i < ITERS; ++i) {
        const int r = i * RPI;
        if (lrow + r >= BM + BN) break;
        const bool is_a = lrow + r < BM;
        const unsigned short* s16 = reinterpret_cast<const unsigned short*>(
            is_a ? gA + int64_t(r) * a.lds + k : gB + int64_t(r - BM) * a.ldt + k);
        const bool row_ok = is_a ? r < a_left : r - BM < b_left;
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = row_ok && k + kc + 2 * e < a.d ? uint32_t(__ldg(s16 + 2 * e)) : 0u;
          const uint32_t hi = row_ok && k + kc + 2 * e + 1 < a.d ? uint32_t(__ldg(s16 + 2 * e + 1)) : 0u;
          w[e] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(dst0 + r * ROWB) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  };

  // ---- shared -> registers (ldmatrix.x4).
  // A (m16 x k16): lanes 0-15 address rows 0-15 at the low 8 k, lanes 16-31 the high 8 k, which
  // gives regs {a0a1, a2a3, a4a5, a6a7} in mma order. B (two n8 x k16 blocks): lanes 0-7 rows 0-7
  // low k, 8-15 rows 0-7 high k, 16-23 rows 8-15 low k, 24-31 rows 8-15 high k, which gives
  // {b0, b1} of the first n8 block, then of the second.
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t a_frag_row = uint32_t((wm * WM + (lane & 15)) * ROWB);
  const uint32_t b_frag_row = uint32_t(BM * ROWB + (wn * WN + (lane & 7) + ((lane >> 4) << 3)) * ROWB);
  const int a_hi = lane >> 4, b_hi = (lane >> 3) & 1, sw = lane & 7;  // row & 7 == lane & 7 here
  const int rot = (wm + wn) & 3;  // this warp's k16 order within a tile: (p + rot) % 4

  uint32_t fa[2][MI][4], fb[2][NI][2];
  auto load_frags = [&](int buf, int stage, int p) {
    const uint32_t st = smem_base + uint32_t(stage * Cfg::STAGE_BYTES);
    const int ks = (p + rot) & 3;
    const uint32_t ac = uint32_t(((2 * ks + a_hi) ^ sw) << 4), bc = uint32_t(((2 * ks + b_hi) ^ sw) << 4);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(fa[buf][mi], st + a_frag_row + mi * 16 * ROWB + ac);
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
      uint32_t r[4];
      ldmatrix_x4(r, st + b_frag_row + nj * 16 * ROWB + bc);
      fb[buf][2 * nj][0] = r[0];
      fb[buf][2 * nj][1] = r[1];
      fb[buf][2 * nj + 1][0] = r[2];
      fb[buf][2 * nj + 1][1] = r[3];
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
  float ssa[MI][2], ssb[NI];  // sums of squares: rows g, g + 8 of each m16 block; column g of each n8
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) ssa[mi][0] = ssa[mi][1] = 0.0f;
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) ssb[ni] = 0.0f;

  // ---- main loop
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_tile(s, kt0 + s);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  load_frags(0, 0, 0);
  int rd = 0, wr = STAGES - 1;  // stage being read / next stage to fill
  for (int kt = 0; kt < nk; ++kt) {
#pragma unroll
    for (int p = 0; p < KSTEPS; ++p) {
      if (p == 0) {
        // Refill the stage of tile kt - 1: every warp passed the barrier after reading it.
        if (kt + STAGES - 1 < nk) load_tile(wr, kt0 + kt + STAGES - 1);
        cp_async_commit();
        wr = wr + 1 == STAGES ? 0 : wr + 1;
      }
      if (p == KSTEPS - 1) {
        // Tile kt + 1 has landed (for every thread), and this tile's last fragments are in
        // registers already, so the next fragment load may start on the next stage.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        rd = rd + 1 == STAGES ? 0 : rd + 1;
      }
      load_frags((p + 1) & 1, rd, (p + 1) % KSTEPS);  // past the last tile: read, never used
      const int cb = p & 1;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], fa[cb][mi], fb[cb][ni][0], fb[cb][ni][1]);
      // Row norms: a0a1 / a4a5 hold row g, a2a3 / a6a7 row g + 8; b0 / b1 hold column g; p is the
      // position in this warp's rotated k16 order (see norm_here).
      if (norm_here<WARPS_N>(p, wn)) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          ssa[mi][0] = sumsq2<T>(fa[cb][mi][2], sumsq2<T>(fa[cb][mi][0], ssa[mi][0]));
          ssa[mi][1] = sumsq2<T>(fa[cb][mi][3], sumsq2<T>(fa[cb][mi][1], ssa[mi][1]));
        }
      }
      if (norm_here<WARPS_M>(p, wm)) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) ssb[ni] = sumsq2<T>(fb[cb][ni][1], sumsq2<T>(fb[cb][ni][0], ssb[ni]));
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all fragment reads done: the stages become scratch

  // ---- norms: quad lanes hold different k of the same row; warps split the k16 steps.
  const int g = lane >> 2, t4 = lane & 3;
  float* red = reinterpret_cast<float*>(smem_raw);  // [WARPS_N][BM] then [WARPS_M][BN]
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = ssa[mi][h];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (t4 == 0) red[wn * BM + wm * WM + mi * 16 + h * 8 + g] = v;
    }
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    float v = ssb[ni];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    if (t4 == 0) red[WARPS_N * BM + wm * BN + wn * WN + ni * 8 + g] = v;
  }
  __syncthreads();
  float* s_inv = red + WARPS_N * BM + WARPS_M * BN;  // [BM + BN]
  bool exact = false;  // this thread saw a row that takes the exact path
  for (int i = tid; i < BM + BN; i += NT) {
    float s = 0.0f;
    if (i < BM) {
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) s += red[w * BM + i];
    } else {
#pragma unroll
      for (int w = 0; w < WARPS_M; ++w) s += red[WARPS_N * BM + w * BN + (i - BM)];
    }
    if constexpr (PARTIAL) {
      if (i < BM) {
        if (tn == 0 && row0 + i < sg.rows) a.sq_s[split * a.sq_stride + sg.sq_off + row0 + i] = s;
      } else {
        if (tm == 0 && col0 + i - BM < sg.cols) a.sq_t[split * a.sq_stride + sg.sq_off + col0 + i - BM] = s;
      }
    } else {
      s_inv[i] = tile_inv_norm(s, i < BM ? row0 + i < sg.rows : col0 + i - BM < sg.cols);
      exact |= isinf(s_inv[i]);
    }
  }

  // ---- epilogue straight from the accumulators: c0 c1 = (row g, cols 2t, 2t + 1), c2 c3 = row g + 8.
  const int rb = wm * WM + g, cbase = wn * WN + 2 * t4;
  bool tile_exact = false;
  if constexpr (!PARTIAL) {
    tile_exact = __syncthreads_or(exact);  // s_inv complete
    // Cost values first, stores after: with no store in between, the compiler can share the
    // position loads and row / column terms across the tile (P, Q and C may alias as far as it
    // knows). Out-of-range rows / columns compute on a clamped index and are not stored.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = rb + mi * 16 + h * 8;
        const int r = min(row0 + lr, sg.rows - 1);
        const float inv_r = s_inv[lr];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = cbase + ni * 8 + e;
            const int c = min(col0 + lc, sg.cols - 1);
            acc[mi][ni][2 * h + e] = cost_value(a, sg, r, c, acc[mi][ni][2 * h + e], inv_r * s_inv[BM + lc]);
          }
      }
  }
  // PARTIAL: the raw dot products of this split; else the cost.
  float* C = a.C + (PARTIAL ? split * a.part_stride : 0) + sg.c_off;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + rb + mi * 16 + h * 8;
      if (r >= sg.rows) continue;
      float* Cr = C + int64_t(r) * sg.cols;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int c = col0 + cbase + ni * 8;
        if (c < sg.cols) Cr[c] = acc[mi][ni][2 * h];
        if (c + 1 < sg.cols) Cr[c + 1] = acc[mi][ni][2 * h + 1];
      }
    }
  if (tile_exact) {
    __syncthreads();  // the tile's stores precede the rewrites
    store_exact_tile(a, sg, row0, col0, BM, BN, s_inv, s_inv + BM, tid, NT);
  }
  if (!PARTIAL && a.ready) {
    __syncthreads();  // every store of the tile precedes the release
    if (tid == 0) signal_ready(a, sg, row0, col0, BM, BN);
  }
}

// Split-K reduction for prune's on-chip path: sums the PARTIAL GEMM's split dot products and sums
// of squares and applies the cost formula, writing C over split 0 (each element reads only its
// own position in every split, so in place is safe). Block (r, k) does row r of segment k, so the
// row's norm is summed once and a thread reads float4s of every split. It runs on every SM, so
// the epilogue does not land on the few SMs of the Sinkhorn clusters that read C next.
constexpr int kReduceThreads = 128;
__global__ __launch_bounds__(kReduceThreads) void cost_reduce_kernel(GemmArgs a, GemmTable tab) {
  launch_dependents();
  const GemmSeg& sg = tab.seg[blockIdx.y];
  const int r = int(blockIdx.x);
  if (r >= sg.rows) return;
  float ss = 0.0f;
  for (int q = 0; q < a.splits; ++q) ss += a.sq_s[q * a.sq_stride + sg.sq_off + r];
  const float inv_r = inv_norm(ss);
  auto cost_at = [&](int c, float dot, float inv) { return cost_checked(a, sg, r, c, dot, inv); };
  float* Cr = a.C + sg.c_off + int64_t(r) * sg.cols;
  const float* Tq = a.sq_t + sg.sq_off;
  const bool vec = sg.cols % 4 == 0 && reinterpret_cast<uintptr_t>(Cr) % 16 == 0 && a.part_stride % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(Tq) % 16 == 0 && a.sq_stride % 4 == 0;
  if (vec) {
    for (int c4 = threadIdx.x; c4 < sg.cols / 4; c4 += kReduceThreads) {
      float4 dot = make_float4(0.0f, 0.0f, 0.0f, 0.0f), st = dot;
      for (int q = 0; q < a.splits; ++q) {
        const float4 d = reinterpret_cast<const float4*>(Cr + q * a.part_stride)[c4];
        const float4 t = reinterpret_cast<const float4*>(Tq + q * a.sq_stride)[c4];
        dot.x += d.x, dot.y += d.y, dot.z += d.z, dot.w += d.w;
        st.x += t.x, st.y += t.y, st.z += t.z, st.w += t.w;
      }
      const int c = 4 * c4;
      reinterpret_cast<float4*>(Cr)[c4] = make_float4(
          cost_at(c, dot.x, inv_r * inv_norm(st.x)), cost_at(c + 1, dot.y, inv_r * inv_norm(st.y)),
          cost_at(c + 2, dot.z, inv_r * inv_norm(st.z)), cost_at(c + 3, dot.w, inv_r * inv_norm(st.w)));
    }
  } else {
    for (int c = threadIdx.x; c < sg.cols; c += kReduceThreads) {
      float dot = 0.0f, st = 0.0f;
      for (int q = 0; q < a.splits; ++q) {
        dot += Cr[q * a.part_stride + c];
        st += Tq[q * a.sq_stride + c];
      }
      Cr[c] = cost_at(c, dot, inv_r * inv_norm(st));
    }
  }
  if (a.ready) {  // the row is published like a GEMM tile (the on-chip kernel overlaps this one too)
    __syncthreads();
    if (threadIdx.x == 0) signal_ready(a, sg, r, 0, 1, sg.cols);
  }
}

// fp32 GEMM on FMA units (no TF32): 64 x 64 block tile, 4 x 4 outputs per thread.
__global__ __launch_bounds__(256) void cost_gemm_f32_kernel(GemmArgs a, GemmTable tab) {
  launch_dependents();
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ float As[BK][BM + 4], Bs[BK][BN + 4];
  const GemmSeg& sg = tab.seg[blockIdx.z];
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  if (row0 >= sg.rows || col0 >= sg.cols) return;
  if (a.done && a.done[sg.id]) return;
  const float* S = static_cast<const float*>(a.S) + sg.s_off;
  const float* Tm = static_cast<const float*>(a.T) + sg.t_off;
  __shared__ float s_inv[BM + BN];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  float sumsq = 0.0f;  // threads 0..63: A row tid; 64..127: B row tid - 64
  for (int64_t k0 = 0; k0 < a.d; k0 += BK) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int e = tid + it * 256, r = e / BK, kk = e % BK;
      const int64_t k = k0 + kk;
      const int ra = row0 + r, cb = col0 + r;
      As[kk][r] = (ra < sg.rows && k < a.d) ? S[int64_t(ra) * a.lds + k] : 0.0f;
      Bs[kk][r] = (cb < sg.cols && k < a.d) ? Tm[int64_t(cb) * a.ldt + k] : 0.0f;
    }
    __syncthreads();
    if (tid < BM + BN) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float v = tid < BM ? As[kk][tid] : Bs[kk][tid - BM];
        sumsq = fmaf(v, v, sumsq);
      }
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
  if (tid < BM + BN) s_inv[tid] = tile_inv_norm(sumsq, tid < BM ? row0 + tid < sg.rows : col0 + tid - BM < sg.cols);
  const bool tile_exact = __syncthreads_or(tid < BM + BN && isinf(s_inv[tid]));
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = row0 + ty * 4 + i, c = col0 + tx * 4 + j;
      if (r < sg.rows && c < sg.cols)
        a.C[sg.c_off + int64_t(r) * sg.cols + c] =
            cost_value(a, sg, r, c, acc[i][j], s_inv[ty * 4 + i] * s_inv[BM + tx * 4 + j]);
    }
  if (tile_exact) {
    __syncthreads();  // the tile's stores precede the rewrites
    store_exact_tile(a, sg, row0, col0, BM, BN, s_inv, s_inv + BM, tid, 256);
  }
  if (a.ready) {
    __syncthreads();  // every store of the tile precedes the release
    if (tid == 0) signal_ready(a, sg, row0, col0, BM, BN);
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers of the GEMM launches (mma.sync here, wgmma in cost_wgmma.cuh; cost_launch.cuh
// chooses between them).
// ---------------------------------------------------------------------------------------------

// Raises a kernel's dynamic shared-memory limit once per device (the attribute belongs to the
// device's context; a function attribute, not a stream operation, so fine during graph capture).
template <auto Kernel>
inline cudaError_t raise_smem_once(int bytes) {
  static bool raised[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess || (dev < 64 && raised[dev])) return e;
  e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && dev < 64) raised[dev] = true;
  return e;
}

// The GEMM kernels' grid (z = segment * splits + split) and their arguments with the split count
// they read; false when z exceeds the grid limit.
inline bool gemm_grid(const GemmArgs& a, bool partial, int cnt, int max_rows, int max_cols, int bm, int bn,
                      GemmArgs* b, dim3* grid) {
  *b = a;
  b->splits = partial ? std::max(a.splits, 1) : 1;
  const long long z = (long long)cnt * b->splits;
  if (z > 65535) return false;
  *grid = dim3(unsigned((max_cols + bn - 1) / bn), unsigned((max_rows + bm - 1) / bm), unsigned(z));
  return true;
}

template <typename T, class Cfg, bool VEC, bool PARTIAL>
inline cudaError_t launch_cost_gemm_tc_cfg(const GemmArgs& a, const GemmTable& tab, int cnt, int max_rows,
                                           int max_cols, cudaStream_t st) {
  constexpr auto kernel = cost_gemm_tc_kernel<T, Cfg, VEC, PARTIAL>;
  const cudaError_t e = raise_smem_once<kernel>(int(Cfg::SMEM));
  if (e != cudaSuccess) return e;
  GemmArgs b;
  dim3 grid;
  if (!gemm_grid(a, PARTIAL, cnt, max_rows, max_cols, Cfg::BM, Cfg::BN, &b, &grid)) return cudaErrorInvalidValue;
  kernel<<<grid, Cfg::NT, Cfg::SMEM, st>>>(b, tab);
  return cudaGetLastError();
}

template <typename T, class Cfg, bool PARTIAL>
inline cudaError_t launch_cost_gemm_tc_cfg(const GemmArgs& a, const GemmTable& tab, int cnt, int max_rows,
                                           int max_cols, bool vec, cudaStream_t st) {
  return vec ? launch_cost_gemm_tc_cfg<T, Cfg, true, PARTIAL>(a, tab, cnt, max_rows, max_cols, st)
             : launch_cost_gemm_tc_cfg<T, Cfg, false, PARTIAL>(a, tab, cnt, max_rows, max_cols, st);
}

}  // namespace detail
}  // namespace topv
