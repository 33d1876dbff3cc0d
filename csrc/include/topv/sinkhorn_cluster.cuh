// Whole-segment Sinkhorn on chip: one thread-block cluster per segment, every pass in one launch
// (sm_90+; the launcher falls back to the pass kernels of sinkhorn.cuh elsewhere).
//
// Why: at n = 576 a pass over C is a few µs of work but a launch and a trip through L2/HBM each;
// the pass kernels need 2 launches per iteration. Here CTA `rank` of a cluster of `cs` keeps its
// row slab of C (rows [rank R, rank R + R), R = ceil(n / cs)) in shared memory for all passes:
// * the slab holds K = -C log2(e) / eps and the potentials are kept in the same base-2 units, so
//   the inner loops are an add, a max and an ex2 (no scaling, no ln/exp conversion per element);
//   rows are padded to a multiple of 4 with K = -inf so they read as float4;
// * row pass: one warp per row, f'_i = log2 a_i - LSE2_j(g_j + K_ij) with the max taken first so
//   the exps are independent (no online-LSE dependency chain); the ratio exp2(f_i - f'_i) gives
//   the row violation and the score as in sinkhorn.cuh;
// * column pass: each CTA reduces its slab to per-column (max, sum) partials in its shared
//   memory; after a cluster barrier CTA `rank` merges the partials of its column slice from every
//   CTA through distributed shared memory, computes g there and writes it into every CTA's copy
//   of g; a second barrier publishes it. Two cluster barriers per iteration, no global traffic.
// * early exit (tol > 0): every CTA writes its slab's violation into every CTA; each sums them in
//   the same order, so the whole cluster takes the same decision without another barrier.
// With `kept`, CTA 0 then selects (select.cuh) from the scores that every CTA pushed into its
// shared memory: prune is the cost GEMM (plus its split-K reduction at B = 1) and this kernel.
#pragma once

#include <cooperative_groups.h>

#include "topv/common.cuh"
#include "topv/select.cuh"

namespace topv {
namespace detail {

constexpr int kClusterThreads = 512;
constexpr int kMaxCluster = 16;  // non-portable cluster size on H100 (8 is portable)

struct ClusterSeg {
  long long c_off;       // C(0, 0) of the segment (leading dimension cols), in C or in every split
  int rows, cols;        // n x m
  int row_off, col_off;  // offsets into the row vectors (f, score, log_a) / column vectors (g, log_b)
  SelSeg sel;            // with `kept`: the selection of this segment (score_off unused)
};

struct ClusterTable {
  ClusterSeg seg[kMaxSegmentsPerLaunch];
};

struct ClusterArgs {
  const float* C;      // the fp32 cost; segment k at C + c_off, leading dimension cols
  const float* log_a;  // nullable: uniform marginals
  const float* log_b;
  float* f;      // nullable: final potentials
  float* g;
  float* score;  // nullable: score after one more row pass (prune)
  int64_t* kept;  // nullable: select from the scores
  float eps, tol;
  int n_iters;
};

// Shared-memory floats for a segment of n x m on a cluster of cs CTAs (see the layout below).
__host__ __device__ constexpr size_t cluster_smem_floats(int n, int m, int cs) {
  return size_t((n + cs - 1) / cs) * ((m + 3) / 4 * 4) + 3 * size_t((m + 3) / 4 * 4) +
         3 * size_t((n + cs - 1) / cs) + kMaxCluster + size_t(n);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Base-2 log-sum-exp partial (max, sum of exp2(x - max)); (-inf, 0) is empty.
__device__ __forceinline__ Lse lse2_merge(Lse a, Lse b) {
  if (b.mx == -INFINITY) return a;
  if (a.mx == -INFINITY) return b;
  const float m = fmaxf(a.mx, b.mx);
  return {m, a.s * exp2f(a.mx - m) + b.s * exp2f(b.mx - m)};
}

// minBlocks 1 lets ptxas use up to 128 registers (left to itself it settles on 64 and spills).
__global__ __launch_bounds__(kClusterThreads, 1) void sinkhorn_cluster_kernel(ClusterArgs a, ClusterTable tab) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int NT = kClusterThreads, NW = NT / 32;
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  cg::cluster_group cluster = cg::this_cluster();
  const int cs = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  const ClusterSeg& sg = tab.seg[blockIdx.y];
  const int n = sg.rows, m = sg.cols, ldm = (m + 3) / 4 * 4;
  const int R = (n + cs - 1) / cs, Mc = (m + cs - 1) / cs;
  const int i0 = rank * R, rows_here = max(0, min(n, i0 + R) - i0);
  const int j0 = rank * Mc, j1 = min(m, j0 + Mc);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float scale = kLog2e / a.eps;  // natural units / eps -> base-2 units

  extern __shared__ __align__(16) float sm[];
  float* Ks = sm;                      // R x ldm slab of K
  float* gv = Ks + size_t(R) * ldm;    // g, every column (ldm: float4 reads)
  float* cmx = gv + ldm;               // column partials of this slab (read by the whole cluster)
  float* csm = cmx + ldm;
  float* fv = csm + ldm;               // f of this slab's rows
  float* fn = fv + R;                  // f' of this slab's rows
  float* scl = fn + R;                 // scores of this slab's rows (the last row pass's)
  float* vred = scl + R;               // violation of each CTA's slab
  float* sc_all = vred + kMaxCluster;  // CTA 0: the segment's scores
  __shared__ float wred[NW];

  // 1. The slab, a warp per row (no index division), 16-byte loads when the rows allow them;
  //    the row's loads are independent, so several are in flight per lane.
  {
    const float* src = a.C + sg.c_off + (long long)i0 * m;
    const bool vec = m % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
    for (int r = warp; r < rows_here; r += NW) {
      const float* row = src + size_t(r) * m;
      float* dst = Ks + size_t(r) * ldm;
      if (vec) {
#pragma unroll 4
        for (int q = lane; q < m / 4; q += 32) {
          const float4 c = __ldg(reinterpret_cast<const float4*>(row) + q);
          reinterpret_cast<float4*>(dst)[q] = make_float4(-scale * c.x, -scale * c.y, -scale * c.z, -scale * c.w);
        }
      } else {
#pragma unroll 4
        for (int j = lane; j < m; j += 32) dst[j] = -scale * __ldg(row + j);
      }
      for (int j = m + lane; j < ldm; j += 32) dst[j] = -INFINITY;
    }
  }
  for (int j = tid; j < ldm; j += NT) gv[j] = 0.0f;
  for (int r = tid; r < rows_here; r += NT) fv[r] = 0.0f;
  __syncthreads();

  // 2. The passes. Every remote access lies between two cluster barriers that all CTAs reach.
  const float la_u = -log2f(float(n)), lb_u = -log2f(float(m));
  const int last = a.score ? a.n_iters + 1 : a.n_iters;
  const float4* g4 = reinterpret_cast<const float4*>(gv);
  for (int t = 1; t <= last; ++t) {
    float vloc = 0.0f;
    for (int r = warp; r < rows_here; r += NW) {
      const float4* k4 = reinterpret_cast<const float4*>(Ks + size_t(r) * ldm);
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll 4
      for (int q = lane; q < ldm / 4; q += 32) {
        const float4 k = k4[q], g = g4[q];
        mx0 = fmaxf(mx0, fmaxf(k.x + g.x, k.y + g.y));
        mx1 = fmaxf(mx1, fmaxf(k.z + g.z, k.w + g.w));
      }
      const float mx = warp_max(fmaxf(mx0, mx1));
      float s0 = 0.0f, s1 = 0.0f;
#pragma unroll 4
      for (int q = lane; q < ldm / 4; q += 32) {
        const float4 k = k4[q], g = g4[q];
        s0 += exp2f(k.x + g.x - mx) + exp2f(k.y + g.y - mx);
        s1 += exp2f(k.z + g.z - mx) + exp2f(k.w + g.w - mx);
      }
      const float lse = mx + log2f(warp_sum(s0 + s1));
      const int i = i0 + r;
      const float la = a.log_a ? a.log_a[sg.row_off + i] * kLog2e : la_u;
      const float ratio = exp2f(fv[r] - la + lse);
      vloc += exp2f(la) * fabsf(ratio - 1.0f);
      if (lane == 0) {
        fn[r] = la - lse;
        scl[r] = float(n) * exp2f(la) * ratio;
      }
    }
    if (t > a.n_iters) break;  // prune's scoring pass has no column half
    const bool check = a.tol > 0.0f && t >= 2;
    if (check) {
      if (lane == 0) wred[warp] = vloc;
      __syncthreads();
      if (tid == 0) {
        float v = 0.0f;
        for (int w = 0; w < NW; ++w) v += wred[w];
        for (int q = 0; q < cs; ++q) *cluster.map_shared_rank(vred + rank, q) = v;
      }
    }
    __syncthreads();  // fn is complete
    // Column partials, two adjacent columns per thread (float2 reads); an empty slab gives
    // (-inf, 0), which the merge skips. Padding columns give NaN and are never merged.
    for (int c2 = tid; c2 < ldm / 2; c2 += NT) {
      const float2* k2 = reinterpret_cast<const float2*>(Ks) + c2;
      float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll 4
      for (int r = 0; r < rows_here; ++r) {
        const float2 k = k2[size_t(r) * (ldm / 2)];
        mxa = fmaxf(mxa, k.x + fn[r]);
        mxb = fmaxf(mxb, k.y + fn[r]);
      }
      float sa = 0.0f, sb = 0.0f;
#pragma unroll 4
      for (int r = 0; r < rows_here; ++r) {
        const float2 k = k2[size_t(r) * (ldm / 2)];
        sa += exp2f(k.x + fn[r] - mxa);
        sb += exp2f(k.y + fn[r] - mxb);
      }
      cmx[2 * c2] = mxa;
      cmx[2 * c2 + 1] = mxb;
      csm[2 * c2] = sa;
      csm[2 * c2 + 1] = sb;
    }
    cluster.sync();  // partials and violations visible cluster-wide
    if (check) {
      float v = 0.0f;
      for (int q = 0; q < cs; ++q) v += vred[q];
      if (v < a.tol) break;  // the plan (f, g) is kept, and its scores are already written
    }
    // Merge: cs adjacent lanes per column, lane q reading CTA q's partial, so the remote loads
    // and the remote stores of g all run in parallel; cs divides 32.
    for (int base = j0; base < j1; base += NT / cs) {
      const int j = base + tid / cs, q = tid % cs;
      const bool ok = j < j1;
      Lse st = ok ? Lse{*cluster.map_shared_rank(cmx + j, q), *cluster.map_shared_rank(csm + j, q)} : lse_empty();
#pragma unroll
      for (int o = 1; o < kMaxCluster; o <<= 1) {
        if (o >= cs) break;
        const Lse w{__shfl_xor_sync(0xffffffffu, st.mx, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
        st = lse2_merge(st, w);
      }
      if (ok) {
        const float lb = a.log_b ? a.log_b[sg.col_off + j] * kLog2e : lb_u;
        *cluster.map_shared_rank(gv + j, q) = lb - (st.mx + log2f(st.s));
      }
    }
    for (int r = tid; r < rows_here; r += NT) fv[r] = fn[r];
    cluster.sync();  // g is published; the partials may be overwritten
  }

  // 3. Outputs, back in natural units. Scores leave only now: a global store inside the loop
  //    would make every cluster barrier's release wait for it.
  __syncthreads();  // the last row pass's scl (written by other warps)
  if (a.score)
    for (int r = tid; r < rows_here; r += NT) {
      a.score[sg.row_off + i0 + r] = scl[r];
      if (a.kept) *cluster.map_shared_rank(sc_all + i0 + r, 0) = scl[r];
    }
  if (a.f)
    for (int r = tid; r < rows_here; r += NT) a.f[sg.row_off + i0 + r] = fv[r] * a.eps * kLn2;
  if (a.g)
    for (int j = j0 + tid; j < j1; j += NT) a.g[sg.col_off + j] = gv[j] * a.eps * kLn2;
  cluster.sync();  // the scores have reached CTA 0; no CTA leaves while others may touch its memory
  if (a.kept && rank == 0) select_block<NT>(sc_all, sg.sel, a.kept);
#endif
}

}  // namespace detail
}  // namespace topv
