// Log-domain Sinkhorn passes over a stored fp32 cost (whole segments or row chunks of one).
//
// Pass t (t = 1 .. n_iters + 1) is a row kernel then (t <= n_iters) a column kernel:
// * row kernel, one warp per row: with L_i = LSE_j((g_j - C_ij)/eps), f'_i = kappa_a eps (log a_i -
//   L_i) into fnew (kappa = tau/(tau + eps), 1 for an exact marginal), and the row mass of the plan
//   (f, g), exp(f_i/eps + L_i), from which the per-row relaxed violation |mass_i - a_i exp(-f_i/tau_a)|
//   and the score n mass_i follow for free.
// * column kernel, one block per 32 columns: online LSE over the rows of (f'_i - C_ij)/eps,
//   accumulated across row chunks in (colmax, colsum); on the last chunk it either accepts the
//   update (g <- kappa_b eps (log b - LSE), f <- f') or, with the tolerance check on and the violation of
//   the current plan (f, g) below tol, marks the segment done and leaves (f, g) as they are.
// Every segment decides on the device; later kernels skip done segments. Nothing syncs the host.
#pragma once

#include "topv/common.cuh"

namespace topv {
namespace detail {

struct SkSeg {
  long long c_off;               // offset of C(r0, 0); leading dimension cols
  int rows, cols;                // full segment size n x m
  int row_off, col_off;          // offsets into the row vectors (f, fnew, viol, score, log_a) / column vectors
  int r0, r1;                    // row chunk [r0, r1) held at c_off
  int id;                        // done flag index
};

struct SkTable {
  SkSeg seg[kMaxSegmentsPerLaunch];
};

struct RowArgs {
  const float* C;
  const float* g;
  const float* f;
  float* fnew;
  float* viol;   // nullable
  float* score;  // nullable
  const float* log_a;  // nullable: uniform
  const int* done;
  float eps;
  float kappa_a, rho_a;  // the source marginal's relaxation; rho_a = eps / tau_a (0: exact)
};

template <int WARPS>
__global__ __launch_bounds__(WARPS * 32) void sk_row_kernel(RowArgs a, SkTable tab) {
  const SkSeg& sg = tab.seg[blockIdx.y];
  if (a.done[sg.id]) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = sg.r0 + blockIdx.x * WARPS + warp;
  if (i >= sg.r1) return;
  const float inv_eps = 1.0f / a.eps;
  const float* c = a.C + sg.c_off + int64_t(i - sg.r0) * sg.cols;
  const float* g = a.g + sg.col_off;
  Lse st = lse_empty();
  const bool vec = (sg.cols % 4 == 0) && (reinterpret_cast<uintptr_t>(c) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(g) % 16 == 0);
  if (vec) {
    const float4* c4 = reinterpret_cast<const float4*>(c);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    for (int j = lane; j < sg.cols / 4; j += 32) {
      const float4 cv = __ldg(c4 + j), gv = __ldg(g4 + j);
      lse_add(st, (gv.x - cv.x) * inv_eps);
      lse_add(st, (gv.y - cv.y) * inv_eps);
      lse_add(st, (gv.z - cv.z) * inv_eps);
      lse_add(st, (gv.w - cv.w) * inv_eps);
    }
  } else {
    for (int j = lane; j < sg.cols; j += 32) lse_add(st, (__ldg(g + j) - __ldg(c + j)) * inv_eps);
  }
  st = warp_lse(st);
  if (lane == 0) {
    const int r = sg.row_off + i;
    const float lse = lse_value(st);
    const float la = a.log_a ? a.log_a[r] : -__logf(float(sg.rows));
    a.fnew[r] = a.kappa_a * a.eps * (la - lse);
    const float fi = a.f[r] * inv_eps, mass = __expf(fi + lse);
    if (a.viol) a.viol[r] = fabsf(mass - __expf(la - a.rho_a * fi));
    if (a.score) a.score[r] = float(sg.rows) * mass;
  }
}

struct ColArgs {
  const float* C;
  const float* fnew;
  float* f;
  float* g;
  float* colmax;
  float* colsum;
  const float* log_b;  // nullable: uniform
  int* done;
  const float* viol;
  float eps, tol;
  float kappa_b;  // the target marginal's relaxation (1: exact)
  int first, last, check;
};

__global__ __launch_bounds__(256) void sk_col_kernel(ColArgs a, SkTable tab) {
  constexpr int WARPS = 8;
  __shared__ float smx[WARPS][32], ssum[WARPS][32];
  __shared__ float sred[WARPS];
  const SkSeg& sg = tab.seg[blockIdx.y];
  if (a.done[sg.id]) return;
  if (int(blockIdx.x) * 32 >= sg.cols) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int j = blockIdx.x * 32 + lane;
  const float inv_eps = 1.0f / a.eps;
  Lse st = lse_empty();
  if (j < sg.cols) {
    const float* fn = a.fnew + sg.row_off;
    const float* c = a.C + sg.c_off + j;
    int i = sg.r0 + warp;
    // Four rows in flight per iteration: the loads are independent of the LSE chain.
    for (; i + 3 * WARPS < sg.r1; i += 4 * WARPS) {
      float cv[4], fv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        cv[u] = __ldg(c + int64_t(i + u * WARPS - sg.r0) * sg.cols);
        fv[u] = fn[i + u * WARPS];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) lse_add(st, (fv[u] - cv[u]) * inv_eps);
    }
    for (; i < sg.r1; i += WARPS) lse_add(st, (fn[i] - __ldg(c + int64_t(i - sg.r0) * sg.cols)) * inv_eps);
  }
  smx[warp][lane] = st.mx;
  ssum[warp][lane] = st.s;
  __syncthreads();
  if (warp == 0) {
    for (int w = 1; w < WARPS; ++w) st = lse_merge(st, Lse{smx[w][lane], ssum[w][lane]});
    if (!a.first && j < sg.cols) st = lse_merge(st, Lse{a.colmax[sg.col_off + j], a.colsum[sg.col_off + j]});
    if (!a.last && j < sg.cols) {
      a.colmax[sg.col_off + j] = st.mx;
      a.colsum[sg.col_off + j] = st.s;
    }
  }
  if (!a.last) return;
  if (a.check) {
    // The violation of the current plan, summed in a fixed order: every block of the segment
    // reaches the same decision without talking to the others.
    float v = 0.0f;
    for (int r = threadIdx.x; r < sg.rows; r += WARPS * 32) v += a.viol[sg.row_off + r];
    v = warp_sum(v);
    if (lane == 0) sred[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) total += sred[w];
    if (total < a.tol) {
      if (blockIdx.x == 0 && threadIdx.x == 0) a.done[sg.id] = 1;
      return;
    }
  }
  if (warp == 0 && j < sg.cols) {
    const float lb = a.log_b ? a.log_b[sg.col_off + j] : -__logf(float(sg.cols));
    a.g[sg.col_off + j] = a.kappa_b * a.eps * (lb - lse_value(st));
  }
  if (blockIdx.x == 0)
    for (int r = threadIdx.x; r < sg.rows; r += WARPS * 32) a.f[sg.row_off + r] = a.fnew[sg.row_off + r];
}

}  // namespace detail
}  // namespace topv
