// Whole-segment Sinkhorn on chip: one thread-block cluster per segment, every pass in one launch
// (sm_90+; the launcher falls back to the pass kernels of sinkhorn.cuh elsewhere).
//
// Why: at n = 576 a pass over C is a few µs of work but a launch and a trip through L2/HBM each;
// the pass kernels need 2 launches per iteration. Here CTA `rank` of a cluster of `cs` keeps its
// row slab of C (rows [rank R, rank R + R), R = ceil(n / cs)) in shared memory for all passes:
// * the slab holds C, loaded by bulk copies (TMA), and K = -C log2(e) / eps is formed in the FMA
//   that adds a potential; the potentials are kept in base-2 units, so the inner loops are an
//   FMA, an add and an ex2 (no ln/exp conversion per element); rows are padded to a multiple of 4
//   with C = +inf so they read as float4;
// * one pass per log-sum-exp, with a shift known before the pass instead of the max: after a
//   column update g_j = lb_j - LSE2_i(K_ij + f_i), so K_ij + g_j <= lb_max - f_i, and after a row
//   update K_ij + f'_i <= la_max - g_j. Every term is then <= 1 and the sum is >= the largest
//   term; only where a row's or a column's total leaves [2^-64, 2^64] (every term far below the
//   bound, the first row pass on a cost with negative entries, non-finite input) is it redone
//   with its max.
//   The first row pass (g = 0) uses the shift 0, exact for costs >= 0 (prune's are);
// * row pass: each warp works on up to kRowsInFlight rows at once (independent chains, one g
//   load for all), f'_i = log2 a_i - LSE2_j(g_j + K_ij); the ratio exp2(f_i - f'_i) gives the
//   row violation and the score as in sinkhorn.cuh;
// * column pass: up to kColSplit row groups of threads per float4 column group (all threads busy
//   at n = 576), summed in shared memory into this slab's column sums. With the common shift
//   these are plain sums, so the merge is a sum: each CTA stores its sums straight into the
//   shared memory of the CTA that owns the column (slot `rank`, so the owner adds them in a fixed
//   order); after a cluster barrier the owner sums its columns locally, computes g and writes it
//   into every CTA's copy of g; a second barrier publishes it. Remote stores only (no round-trip
//   remote loads), two cluster barriers per iteration, no global traffic;
// * early exit (tol > 0): every CTA writes its slab's violation into every CTA; each sums them in
//   the same order, so the whole cluster takes the same decision without another barrier.
// With `kept`, CTA 0 then selects (select.cuh) from the scores that every CTA pushed into its
// shared memory: prune is the cost GEMM (plus its split-K reduction at B = 1) and this kernel.
#pragma once

#include <cooperative_groups.h>

#include <type_traits>

#include "topv/common.cuh"
#include "topv/select.cuh"

namespace topv {
namespace detail {

constexpr int kClusterThreads = 512;
constexpr int kMaxCluster = 16;    // non-portable cluster size on H100 (8 is portable)
constexpr int kRowsInFlight = 3;   // rows a warp's row pass works on at once (3: 128 registers, no spills)
constexpr int kColSplit = 4;       // most row groups per column group in the column pass

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
  return size_t((n + cs - 1) / cs) * ((m + 3) / 4 * 4) + (2 + kColSplit) * size_t((m + 3) / 4 * 4) + kMaxCluster +
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

// Whether a sum of exp2(x - shift) taken with an upper bound as the shift is usable: its largest
// term is >= sum / n >= 2^-78, so the terms that flush to zero (< 2^-126) change it by < 2^-34.
__device__ __forceinline__ bool shifted_sum_ok(float s) { return s >= 0x1p-64f && s <= 0x1p64f; }

// Max over the n values v[i] * scale by the whole block (uniform result; uses red[0 .. NW]).
template <int NT>
__device__ float block_max(const float* v, int n, float scale, float* red) {
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < n; i += NT) mx = fmaxf(mx, v[i] * scale);
  mx = warp_max(mx);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    const float w = warp_max(threadIdx.x < NT / 32 ? red[threadIdx.x] : -INFINITY);
    if (threadIdx.x == 0) red[NT / 32] = w;
  }
  __syncthreads();
  mx = red[NT / 32];
  __syncthreads();  // red is reused
  return mx;
}

// minBlocks 1 lets ptxas use up to 128 registers (left to itself it settles on 64 and spills).
__global__ __launch_bounds__(kClusterThreads, 1) void sinkhorn_cluster_kernel(ClusterArgs a, ClusterTable tab) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int NT = kClusterThreads, NW = NT / 32, RB = kRowsInFlight;
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  cg::cluster_group cluster = cg::this_cluster();
  const int cs = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  const ClusterSeg& sg = tab.seg[blockIdx.y];
  const int n = sg.rows, m = sg.cols, ldm = (m + 3) / 4 * 4, Q = ldm / 4;
  const int R = (n + cs - 1) / cs, Mc = (m + cs - 1) / cs;
  const int i0 = rank * R, rows_here = max(0, min(n, i0 + R) - i0);
  const int j0 = rank * Mc, j1 = min(m, j0 + Mc);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float ns = -kLog2e / a.eps;  // K = ns C: cost in natural units -> -C / eps in base-2 units

  extern __shared__ __align__(16) float sm[];
  float* Cs = sm;                      // R x ldm slab of C
  float* gv = Cs + size_t(R) * ldm;    // g, every column (ldm: float4 reads)
  float* csum = gv + ldm;              // column sums of this slab (row group 0 of the column pass)
  float* cpart = csum + ldm;           // row groups 1 .. kColSplit - 1
  float* cin = cpart + (kColSplit - 1) * size_t(ldm);  // every CTA's sums of this CTA's columns
  float* fv = cin + ldm + kMaxCluster;  // f of this slab's rows
  float* fn = fv + R;                  // f' of this slab's rows
  float* scl = fn + R;                 // scores of this slab's rows (the last row pass's)
  float* vred = scl + R;               // violation of each CTA's slab
  float* sc_all = vred + kMaxCluster;  // CTA 0: the segment's scores
  __shared__ float wred[NW + 1];

  // Uniform log-marginals and the shift bounds: the largest log-marginals (base 2).
  const float la_u = -log2f(float(n)), lb_u = -log2f(float(m));
  const float la_max = a.log_a ? block_max<NT>(a.log_a + sg.row_off, n, kLog2e, wred) : la_u;
  const float lb_max = a.log_b ? block_max<NT>(a.log_b + sg.col_off, m, kLog2e, wred) : lb_u;

  // 1. The slab, as C (every use scales it in an FMA, which costs what the add it replaces did).
  //    Contiguous rows (m % 4 == 0, 16-byte-aligned source) come in bulk copies (TMA) of up to
  //    32 KB; else a warp per row, +inf in the padding (K = -inf).
  __shared__ alignas(8) unsigned long long slab_bar;
  const float* src = a.C + sg.c_off + (long long)i0 * m;
  const bool bulk = m % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  if (bulk) {
    if (tid == 0) {
      mbar_init(smem_addr(&slab_bar), 1u);
      mbar_init_fence();
    }
  } else {
    for (int r = warp; r < rows_here; r += NW) {
      const float* row = src + size_t(r) * m;
      float* dst = Cs + size_t(r) * ldm;
#pragma unroll 4
      for (int j = lane; j < m; j += 32) dst[j] = __ldg(row + j);
      for (int j = m + lane; j < ldm; j += 32) dst[j] = INFINITY;
    }
  }
  for (int j = tid; j < ldm; j += NT) gv[j] = 0.0f;
  for (int r = tid; r < rows_here; r += NT) fv[r] = 0.0f;
  __syncthreads();
  if (bulk) {
    const uint32_t bar = smem_addr(&slab_bar), bytes = uint32_t(rows_here) * uint32_t(m) * 4u;
    if (tid == 0) {
      mbar_arrive_expect_tx(bar, bytes);
      for (uint32_t o = 0; o < bytes; o += 32768u)
        bulk_load(smem_addr(Cs) + o, reinterpret_cast<const char*>(src) + o, min(32768u, bytes - o), bar);
    }
    mbar_wait(bar, 0u);
  }

  // 2. The passes. Every remote access lies between two cluster barriers that all CTAs reach.
  const int last = a.score ? a.n_iters + 1 : a.n_iters;
  const float4* g4 = reinterpret_cast<const float4*>(gv);
  // LSE2_j (K_rj + g_j) of slab row r with the max taken first: where the shifted sum misses.
  auto row_lse_exact = [&](int r) {
    const float4* c4 = reinterpret_cast<const float4*>(Cs + size_t(r) * ldm);
    float mx0 = -INFINITY, mx1 = -INFINITY;
    for (int q = lane; q < Q; q += 32) {
      const float4 c = c4[q], g = g4[q];
      mx0 = fmaxf(mx0, fmaxf(fmaf(c.x, ns, g.x), fmaf(c.y, ns, g.y)));
      mx1 = fmaxf(mx1, fmaxf(fmaf(c.z, ns, g.z), fmaf(c.w, ns, g.w)));
    }
    const float mx = warp_max(fmaxf(mx0, mx1));
    float s = 0.0f;
    for (int q = lane; q < Q; q += 32) {
      const float4 c = c4[q], g = g4[q];
      s += exp2f(fmaf(c.x, ns, g.x) - mx) + exp2f(fmaf(c.y, ns, g.y) - mx) + exp2f(fmaf(c.z, ns, g.z) - mx) +
           exp2f(fmaf(c.w, ns, g.w) - mx);
    }
    return mx + log2f(warp_sum(s));
  };
  // Column pass layout: H row groups of threads over the Q float4 column groups.
  const int H = max(1, min(kColSplit, NT / Q));
  // g layout: L lanes per column (a power of 2 dividing cs) so a CTA's columns take one round.
  int L = cs;
  while (L > 1 && (Mc * L > NT)) L >>= 1;
  for (int t = 1; t <= last; ++t) {
    float vloc = 0.0f;
    // Rows r0, r0 + NW, ... (NR of them, a compile-time count so no lane works on a copy).
    auto row_pass = [&](auto nr, int r0) {
      constexpr int NR = decltype(nr)::value;
      float sh[NR], s[NR];
      const float4* cr[NR];
#pragma unroll
      for (int u = 0; u < NR; ++u) {
        const int r = r0 + u * NW;
        cr[u] = reinterpret_cast<const float4*>(Cs + size_t(r) * ldm);
        sh[u] = t >= 2 ? lb_max - fv[r] : 0.0f;
        s[u] = 0.0f;
      }
#pragma unroll 2
      for (int q = lane; q < Q; q += 32) {
        const float4 g = g4[q];
#pragma unroll
        for (int u = 0; u < NR; ++u) {
          const float4 c = cr[u][q];
          s[u] += exp2f(fmaf(c.x, ns, g.x) - sh[u]) + exp2f(fmaf(c.y, ns, g.y) - sh[u]) +
                  exp2f(fmaf(c.z, ns, g.z) - sh[u]) + exp2f(fmaf(c.w, ns, g.w) - sh[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < NR; ++u) s[u] = warp_sum(s[u]);
#pragma unroll
      for (int u = 0; u < NR; ++u) {
        const int r = r0 + u * NW, i = i0 + r;
        const float lse = shifted_sum_ok(s[u]) ? sh[u] + log2f(s[u]) : row_lse_exact(r);  // warp-uniform
        const float la = a.log_a ? a.log_a[sg.row_off + i] * kLog2e : la_u;
        const float ratio = exp2f(fv[r] - la + lse);
        vloc += exp2f(la) * fabsf(ratio - 1.0f);
        if (lane == 0) {
          fn[r] = la - lse;
          scl[r] = float(n) * exp2f(la) * ratio;
        }
      }
    };
    for (int r0 = warp; r0 < rows_here; r0 += NW * RB) {
      static_assert(RB == 3, "one case per row count");
      switch (min(RB, (rows_here - r0 + NW - 1) / NW)) {
        case 3: row_pass(std::integral_constant<int, 3>{}, r0); break;
        case 2: row_pass(std::integral_constant<int, 2>{}, r0); break;
        default: row_pass(std::integral_constant<int, 1>{}, r0); break;
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
    // Column sums with the shift la_max - g_j, row group h of column group c4 taking rows
    // h, h + H, ...; group 0 writes csum, the others cpart.
    for (int e = tid; e < Q * H; e += NT) {
      const int c4 = e % Q, h = e / Q;
      const float4 g = g4[c4];
      const float4 sh = make_float4(la_max - g.x, la_max - g.y, la_max - g.z, la_max - g.w);
      const float4* col = reinterpret_cast<const float4*>(Cs) + c4;
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
      for (int r = h; r < rows_here; r += H) {
        const float4 c = col[size_t(r) * Q];
        const float f = fn[r];
        s.x += exp2f(fmaf(c.x, ns, f) - sh.x);
        s.y += exp2f(fmaf(c.y, ns, f) - sh.y);
        s.z += exp2f(fmaf(c.z, ns, f) - sh.z);
        s.w += exp2f(fmaf(c.w, ns, f) - sh.w);
      }
      reinterpret_cast<float4*>(h == 0 ? csum : cpart + (h - 1) * size_t(ldm))[c4] = s;
    }
    __syncthreads();
    // This slab's sum of each column goes to the CTA that owns the column, into slot `rank`.
    // Padding columns are never sent.
    for (int j = tid; j < m; j += NT) {
      float s = csum[j];
      for (int h = 1; h < H; ++h) s += cpart[(h - 1) * size_t(ldm) + j];
      const int o = j / Mc;
      *cluster.map_shared_rank(cin + rank * Mc + (j - o * Mc), o) = s;
    }
    cluster.sync();  // column sums and violations visible cluster-wide
    if (check) {
      float v = 0.0f;
      for (int q = 0; q < cs; ++q) v += vred[q];
      if (v < a.tol) break;  // the plan (f, g) is kept, and its scores are already written
    }
    // g of this CTA's columns: L adjacent lanes per column sum the cs slabs' sums in a fixed
    // order (so the result does not depend on timing), and the lane that summed CTA q's sum
    // writes g into CTA q. L divides 32. A total outside the shifted range is recomputed
    // exactly from every CTA's slab (a rare path; all lanes of the warp take it together).
    for (int base = j0; base < j1; base += NT / L) {
      const int j = base + tid / L, l = tid % L;
      const bool here = j < j1;
      float tot = 0.0f;
      if (here)
        for (int q = l; q < cs; q += L) tot += cin[q * Mc + (j - j0)];
#pragma unroll
      for (int o = 1; o < kMaxCluster; o <<= 1) {
        if (o >= L) break;
        tot += __shfl_xor_sync(0xffffffffu, tot, o);
      }
      float lse = la_max - (here ? gv[j] : 0.0f) + log2f(tot);
      const bool exact = here && !shifted_sum_ok(tot);
      if (__any_sync(0xffffffffu, exact)) {
        Lse st = lse_empty();
        if (exact)
          for (int q = l; q < cs; q += L) {
            const float* Cq = cluster.map_shared_rank(Cs, q);
            const float* fq = cluster.map_shared_rank(fn, q);
            const int rq = max(0, min(n, (q + 1) * R) - q * R);
            float mx = -INFINITY, sq = 0.0f;
            for (int r = 0; r < rq; ++r) mx = fmaxf(mx, fmaf(Cq[size_t(r) * ldm + j], ns, fq[r]));
            if (mx != -INFINITY)
              for (int r = 0; r < rq; ++r) sq += exp2f(fmaf(Cq[size_t(r) * ldm + j], ns, fq[r]) - mx);
            st = lse2_merge(st, Lse{mx, sq});
          }
#pragma unroll
        for (int o = 1; o < kMaxCluster; o <<= 1) {
          if (o >= L) break;
          const Lse w{__shfl_xor_sync(0xffffffffu, st.mx, o), __shfl_xor_sync(0xffffffffu, st.s, o)};
          st = lse2_merge(st, w);
        }
        if (exact) lse = st.mx + log2f(st.s);
      }
      if (here) {
        const float lb = a.log_b ? a.log_b[sg.col_off + j] * kLog2e : lb_u;
        const float gj = lb - lse;
        for (int q = l; q < cs; q += L) *cluster.map_shared_rank(gv + j, q) = gj;
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
