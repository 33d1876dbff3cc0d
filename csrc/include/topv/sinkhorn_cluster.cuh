// Whole-segment Sinkhorn on chip: one thread-block cluster per segment, every pass in one launch
// (sm_90+; the launcher falls back to the pass kernels of sinkhorn.cuh elsewhere).
//
// Why: at n = 576 a pass over C is a few µs of work but a launch and a trip through L2/HBM each;
// the pass kernels need 2 launches per iteration. Here CTA `rank` of a cluster of `cs` keeps its
// row slab (rows [rank R, rank R + R), R = ceil(n / cs)) in shared memory for all passes. The
// potentials are kept in base-2 units (K = -C log2(e) / eps), rows padded to a multiple of 4 so
// they read as float4.
// * The slab first holds C, loaded by bulk copies (TMA); the first row pass (g = 0) takes
//   LSE2_j K_ij with the shift 0 (exact for costs >= 0, prune's), giving F = f after it.
// * The first column pass replaces C by Q_ij = exp2(K_ij + F_i - la_max) in place (every term it
//   sums). From then on the transport plan is
//   P_ij = Q_ij u_i y_j 2^lb_max with row factors u_i = exp2(f_i - F_i) and column factors
//   y_j = exp2(g_j + la_max - lb_max), so every later pass is a matrix-vector product:
//   LSE2_j(K_ij + g_j) = lb_max - F_i + log2 sum_j Q_ij y_j, LSE2_i(K_ij + f_i) = la_max +
//   log2 sum_i Q_ij u_i. That is an FMA per element instead of an FMA, an add and an ex2 (MUFU
//   issues at 1/8 of the FMA rate); 2 of prune's 7 passes still exponentiate. (The passes are
//   mostly latency-bound at 4 warps per scheduler, so this gains less than the op count says.)
//   The potentials stay the state (u and y are recomputed from them every pass), so nothing drifts.
// * Where a sum may have lost precision it is redone exactly, max first, from C in global memory:
//   Q entries and products below 2^-126 flush to zero, which changes a row sum by at most
//   m 2^-126 max(y_max, 1), so a row sum below 2^-64 max(y_max, 1) (and a column sum below
//   2^-64 max(u_max, 1)) or above 2^100 takes the exact path; so does a first-row-pass sum outside
//   [2^-64, 2^64] (negative costs, non-finite input). Tiny eps or extreme costs get there; prune's
//   costs at eps = 0.1 never do.
// * Row pass: each warp works on up to kRowsInFlight rows at once (independent chains, one y load
//   for all), f'_i = kappa_a (log2 a_i - L_i) with L_i = LSE2_j(K_ij + g_j); the row mass
//   exp2(f_i + L_i) of the plan (f, g) gives the relaxed row violation and the score as in
//   sinkhorn.cuh. (With a relaxed source marginal the rows of exp2(K + F) no longer sum to a_i, so
//   Q may exceed 1; nothing below needs Q <= 1: the bounds only count flushed terms.) The first row pass takes one row at a time, as
//   the slab's chunks land.
// * Column pass: up to kColSplit row groups of threads per float4 column group (all threads busy
//   at n = 576), summed in shared memory into this slab's column sums. The merge is a plain sum:
//   each CTA pushes its sums straight into the shared memory of the CTA that owns the column
//   (slot `rank`, so the owner adds them in a fixed order) with st.async, which completes on the
//   owner's mbarrier; the owner sums its columns locally, computes g and pushes g and y into every
//   CTA the same way. No cluster barrier in the loop (barrier.cluster's release fences cost ~13 %
//   of the kernel's stall samples): each CTA waits on its own barriers, and the order of the
//   pushes keeps every buffer from being refilled before it is read (see the loop).
// * Early exit (tol > 0): every CTA pushes its slab's violation into every CTA; each sums them in
//   the same order, so the whole cluster takes the same decision.
// * Start: with `ready`, the kernel runs alongside the GEMM that writes C (programmatic dependent
//   launch) and each cluster waits until its segment's C is complete (see ClusterArgs).
// With `kept`, CTA 0 then selects (select.cuh) from the scores that every CTA pushed into its
// shared memory. (A separate selection kernel after a multi-wave launch measured slower, B = 64:
// 571 vs 562 µs: the other CTAs' SMs already take the next clusters while CTA 0 selects.)
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
constexpr int kSlabChunks = 8;     // bulk-copied slabs arrive in up to this many row chunks

struct ClusterSeg {
  long long c_off;       // C(0, 0) of the segment (leading dimension cols), in C or in every split
  int rows, cols;        // n x m
  int row_off, col_off;  // offsets into the row vectors (f, score, log_a) / column vectors (g, log_b)
  int id;                // with `ready`: the segment's counter
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
  // Nullable: the GEMM that writes C runs concurrently (programmatic dependent launch) and adds
  // the elements it stored to ready[id]; a segment's slab is read once it reaches rows x cols.
  const int* ready;
  float eps, tol;
  int n_iters;
  float kappa_a, rho_a, kappa_b;  // the marginals' relaxation (see sinkhorn.cuh's RowArgs / ColArgs)
};

// Shared-memory floats for a segment of n x m on a cluster of cs CTAs (see the layout below).
__host__ __device__ constexpr size_t cluster_smem_floats(int n, int m, int cs) {
  return size_t((n + cs - 1) / cs) * ((m + 3) / 4 * 4) + (3 + kColSplit) * size_t((m + 3) / 4 * 4) + kMaxCluster +
         5 * size_t((n + cs - 1) / cs) + 2 * kMaxCluster + size_t(n);
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

// The exact paths, max first, from C in global memory. Rarely taken, so kept out of line: the
// kernel's passes each run once per iteration, and the instruction fetches of a larger body cost
// more than the call.
// LSE2_j (ns C_ij + g_j) of one row (the calling warp); g = 0 (before the first column update)
// where gv is null.
__device__ __noinline__ float row_lse_exact(const float* row, int m, float ns, const float* gv) {
  const int lane = threadIdx.x & 31;
  auto term = [&](int j) { return fmaf(row[j], ns, gv ? gv[j] : 0.0f); };
  float mx = -INFINITY;
  for (int j = lane; j < m; j += 32) mx = fmaxf(mx, term(j));
  mx = warp_max(mx);
  float s = 0.0f;
  if (mx != -INFINITY)
    for (int j = lane; j < m; j += 32) s += exp2f(term(j) - mx);
  return mx + log2f(warp_sum(s));
}

// (max, sum) of ns C_ij + f_i over the rows of CTAs q = l, l + L, ... < cs of column j (rows of
// CTA q: [q R, min(n, q R + R)), f from that CTA's fn).
__device__ __noinline__ Lse col_lse_exact(const float* Cg, int n, int m, int R, int cs, int j, int l, int L, float ns,
                                          const float* fn) {
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  Lse st = lse_empty();
  for (int q = l; q < cs; q += L) {
    const float* fq = cluster.map_shared_rank(fn, q);
    const float* cq = Cg + (long long)q * R * m + j;
    const int rq = max(0, min(n, (q + 1) * R) - q * R);
    float mx = -INFINITY, sq = 0.0f;
    for (int r = 0; r < rq; ++r) mx = fmaxf(mx, fmaf(cq[(long long)r * m], ns, fq[r]));
    if (mx != -INFINITY)
      for (int r = 0; r < rq; ++r) sq += exp2f(fmaf(cq[(long long)r * m], ns, fq[r]) - mx);
    st = lse2_merge(st, Lse{mx, sq});
  }
  return st;
}

// A store into CTA `rank`'s shared memory (at the address `saddr` has here) that completes its
// bytes on that CTA's mbarrier at `sbar`: no cluster barrier, and no fence, orders it.
__device__ __forceinline__ void st_async(uint32_t saddr, float v, uint32_t sbar, int rank) {
  uint32_t ra, rb;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(saddr), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rb) : "r"(sbar), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];\n" ::"r"(ra), "f"(v), "r"(rb)
               : "memory");
}

// Split cluster barrier: every CTA arrives once its shared memory is initialised and waits before
// its first remote access (a CTA's shared memory may be accessed only once it has started).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }

// minBlocks 1 lets ptxas use up to 128 registers (left to itself it settles on 64 and spills).
__global__ __launch_bounds__(kClusterThreads, 1) void sinkhorn_cluster_kernel(ClusterArgs a, ClusterTable tab) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int NT = kClusterThreads, NW = NT / 32, RB = kRowsInFlight;
  constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
  cg::cluster_group cluster = cg::this_cluster();
  const int cs = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  const ClusterSeg& sg = tab.seg[blockIdx.y];
  const int n = sg.rows, m = sg.cols, ldm = (m + 3) / 4 * 4, Q4 = ldm / 4;
  const int R = (n + cs - 1) / cs, Mc = (m + cs - 1) / cs;
  const int i0 = rank * R, rows_here = max(0, min(n, i0 + R) - i0);
  const int j0 = rank * Mc, j1 = min(m, j0 + Mc);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float ns = -kLog2e / a.eps;  // K = ns C: cost in natural units -> -C / eps in base-2 units
  const float* Cg = a.C + sg.c_off;  // the segment's C in global memory (the exact paths read it)

  extern __shared__ __align__(16) float sm[];
  float* Cs = sm;                      // R x ldm slab: C, then Q after the first column pass
  float* gv = Cs + size_t(R) * ldm;    // g, every column
  float* yv = gv + ldm;                // y, every column (float4 reads)
  float* csum = yv + ldm;              // column sums of this slab (row group 0 of the column pass)
  float* cpart = csum + ldm;           // row groups 1 .. kColSplit - 1
  float* cin = cpart + (kColSplit - 1) * size_t(ldm);  // every CTA's sums of this CTA's columns
  float* fb = cin + ldm + kMaxCluster;  // f of this slab's rows after iteration t at fb + (t & 1) R
  float* Fv = fb + 2 * R;              // F: f after the first row pass (Q's row scale)
  float* uv = Fv + R;                  // u = exp2(f' - F)
  float* scl = uv + R;                 // scores of this slab's rows (the last row pass's)
  float* vred = scl + R;               // violation of each CTA's slab
  float* umx = vred + kMaxCluster;     // max u of each CTA's slab
  float* sc_all = umx + kMaxCluster;   // CTA 0: the segment's scores
  __shared__ float wred[NW + 1], wumx[NW];

  // Uniform log-marginals and the shift bounds: the largest log-marginals (base 2).
  const float la_u = -log2f(float(n)), lb_u = -log2f(float(m));
  const float la_max = a.log_a ? block_max<NT>(a.log_a + sg.row_off, n, kLog2e, wred) : la_u;
  const float lb_max = a.log_b ? block_max<NT>(a.log_b + sg.col_off, m, kLog2e, wred) : lb_u;

  // 1. The slab, as C (the first passes scale it in an FMA, which costs what the add it replaces
  //    did). Contiguous rows (m % 4 == 0, 16-byte-aligned source) come in bulk copies (TMA) of up
  //    to 32 KB, in chunks of rc rows with a barrier each: the first row pass takes each row as
  //    soon as its chunk has landed, so it runs under the load. Else a warp per row, +inf in the
  //    padding (K = -inf, Q = 0).
  __shared__ alignas(8) unsigned long long slab_bar[kSlabChunks];
  const float* src = Cg + (long long)i0 * m;
  const bool bulk = m % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  const int rc = max(1, (rows_here + kSlabChunks - 1) / kSlabChunks);
  // The merge's barriers: cbar takes this CTA's columns' sums and every CTA's violation and largest
  // u, ybar every column's g and y (st_async pushes); each completes once per iteration.
  __shared__ alignas(8) unsigned long long merge_bar[2];
  const uint32_t cbar = smem_addr(&merge_bar[0]), ybar = smem_addr(&merge_bar[1]);
  if (tid == 0) {
    if (bulk)
      for (int c = 0; c * rc < rows_here; ++c) mbar_init(smem_addr(&slab_bar[c]), 1u);
    mbar_init(cbar, 1u);
    mbar_init(ybar, 1u);
    mbar_init_fence();  // visible cluster-wide by the time the peers pass cluster_wait
  }
  for (int j = tid; j < ldm; j += NT) gv[j] = 0.0f;
  for (int r = tid; r < rows_here; r += NT) fb[r] = 0.0f;
  if (a.ready && tid == 0) {
    const int want = n * m;
    int got;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(got) : "l"(a.ready + sg.id) : "memory");
      if (got >= want) break;
      __nanosleep(256);
    }
    // The bulk copies read C through the async proxy: order them after the acquire.
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
  }
  __syncthreads();  // the barrier is initialised and C is complete
  cluster_arrive_relaxed();
  if (bulk) {
    if (tid == 0)
      for (int c = 0; c * rc < rows_here; ++c) {
        const uint32_t bar = smem_addr(&slab_bar[c]), row_bytes = uint32_t(m) * 4u;
        const uint32_t first = uint32_t(c * rc) * row_bytes, bytes = uint32_t(min(rc, rows_here - c * rc)) * row_bytes;
        mbar_arrive_expect_tx(bar, bytes);
        for (uint32_t o = 0; o < bytes; o += 32768u)
          bulk_load(smem_addr(Cs) + first + o, reinterpret_cast<const char*>(src) + first + o, min(32768u, bytes - o),
                    bar);
      }
  } else {
    // Plain loads, not __ldg: with `ready`, C may have been written while this kernel ran.
    for (int r = warp; r < rows_here; r += NW) {
      const float* row = src + size_t(r) * m;
      float* dst = Cs + size_t(r) * ldm;
#pragma unroll 4
      for (int j = lane; j < m; j += 32) dst[j] = row[j];
      for (int j = m + lane; j < ldm; j += 32) dst[j] = INFINITY;
    }
    __syncthreads();
  }
  cluster_wait();

  // 2. The passes. Remote accesses: st.async pushes, ordered by the receivers' mbarriers; the
  //    exact column path's reads of a peer's f' (double-buffered); the scores pushed to CTA 0
  //    before the closing cluster barrier.
  const int last = a.score ? a.n_iters + 1 : a.n_iters;
  const float4* y4 = reinterpret_cast<const float4*>(yv);
  // Column pass layout: H row groups of threads over the Q4 float4 column groups.
  const int H = max(1, min(kColSplit, NT / Q4));
  // g layout: L lanes per column (a power of 2 dividing cs) so a CTA's columns take one round.
  int L = cs;
  while (L > 1 && (Mc * L > NT)) L >>= 1;
  // Pushes per iteration: into cbar, every CTA's sums of this CTA's columns and its violation and
  // largest u; into ybar, g and y of every column.
  const uint32_t cbytes = uint32_t(cs) * 4u * uint32_t(max(0, j1 - j0) + 2), ybytes = uint32_t(m) * 8u;
  int ysent = 0, ywaited = 0;  // ybar phases pushed / waited for
  const float* fres = fb;      // f of the plan the outputs describe
  for (int t = 1; t <= last; ++t) {
    float vloc = 0.0f, uw = 1.0f;  // this warp's violation and largest u
    float* fv = fb + ((t - 1) & 1) * R;  // f before this iteration
    float* fn = fb + (t & 1) * R;        // f' (double-buffered: peers' exact column paths read it
                                         // while this CTA may already run the next row pass)
    if (t >= 2) mbar_wait(ybar, uint32_t(ywaited++ & 1));  // g and y of iteration t - 1
    if (tid == 0 && t <= a.n_iters) {  // after the wait, so the arrival counts for this phase
      mbar_arrive_expect_tx(cbar, cbytes);
      mbar_arrive_expect_tx(ybar, ybytes);
    }
    // Rows r0, r0 + NW, ... (NR of them, a compile-time count so no lane works on a copy); QM:
    // the slab holds Q (t >= 2), else C with g = 0 (t = 1).
    auto row_pass = [&](auto nr, auto qm, int r0) {
      constexpr int NR = decltype(nr)::value;
      constexpr bool QM = decltype(qm)::value;
      float4 s[NR];
      const float4* cr[NR];
#pragma unroll
      for (int u = 0; u < NR; ++u) {
        cr[u] = reinterpret_cast<const float4*>(Cs + size_t(r0 + u * NW) * ldm);
        s[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      float ym = 0.0f;
#pragma unroll 2
      for (int q = lane; q < Q4; q += 32) {
        if constexpr (QM) {
          const float4 y = y4[q];
          ym = fmaxf(ym, fmaxf(fmaxf(y.x, y.y), fmaxf(y.z, y.w)));
#pragma unroll
          for (int u = 0; u < NR; ++u) {
            const float4 c = cr[u][q];
            s[u].x = fmaf(c.x, y.x, s[u].x);
            s[u].y = fmaf(c.y, y.y, s[u].y);
            s[u].z = fmaf(c.z, y.z, s[u].z);
            s[u].w = fmaf(c.w, y.w, s[u].w);
          }
        } else {
#pragma unroll
          for (int u = 0; u < NR; ++u) {
            const float4 c = cr[u][q];
            s[u].x += exp2f(c.x * ns);
            s[u].y += exp2f(c.y * ns);
            s[u].z += exp2f(c.z * ns);
            s[u].w += exp2f(c.w * ns);
          }
        }
      }
      float tot[NR];
#pragma unroll
      for (int u = 0; u < NR; ++u) tot[u] = warp_sum((s[u].x + s[u].y) + (s[u].z + s[u].w));
      const float yfloor = QM ? 0x1p-64f * fmaxf(warp_max(ym), 1.0f) : 0.0f;
#pragma unroll
      for (int u = 0; u < NR; ++u) {
        const int r = r0 + u * NW, i = i0 + r;
        const bool ok = QM ? tot[u] >= yfloor && tot[u] <= 0x1p100f : shifted_sum_ok(tot[u]);  // warp-uniform
        const float lse = !ok ? row_lse_exact(Cg + (long long)i * m, m, ns, QM ? gv : nullptr)
                          : QM  ? lb_max - Fv[r] + log2f(tot[u])
                                : log2f(tot[u]);
        const float la = a.log_a ? a.log_a[sg.row_off + i] * kLog2e : la_u;
        const float mass = exp2f(fv[r] + lse);  // row mass of the plan (f, g)
        const float f2 = a.kappa_a * (la - lse);
        vloc += fabsf(mass - exp2f(la - a.rho_a * fv[r]));
        const float uu = QM ? exp2f(f2 - Fv[r]) : 1.0f;
        uw = fmaxf(uw, uu);
        if (lane == 0) {
          fn[r] = f2;
          scl[r] = float(n) * mass;
          if (QM) uv[r] = uu; else Fv[r] = f2;
        }
      }
    };
    auto row_rows = [&] {
      for (int r0 = warp; r0 < rows_here; r0 += NW * RB) {
        static_assert(RB == 3, "one case per row count");
        switch (min(RB, (rows_here - r0 + NW - 1) / NW)) {
          case 3: row_pass(std::integral_constant<int, 3>{}, std::true_type{}, r0); break;
          case 2: row_pass(std::integral_constant<int, 2>{}, std::true_type{}, r0); break;
          default: row_pass(std::integral_constant<int, 1>{}, std::true_type{}, r0); break;
        }
      }
    };
    if (t == 1) {
      // One row at a time, in slab order, each once its chunk has landed (every chunk is waited
      // for by some warp, and the barrier after the pass orders it for all threads).
      for (int r = warp; r < rows_here; r += NW) {
        if (bulk) mbar_wait(smem_addr(&slab_bar[r / rc]), 0u);
        row_pass(std::integral_constant<int, 1>{}, std::false_type{}, r);
      }
    } else {
      row_rows();
    }
    if (t > a.n_iters) break;  // prune's scoring pass has no column half
    const bool check = a.tol > 0.0f && t >= 2;
    if (lane == 0) {
      wred[warp] = vloc;
      wumx[warp] = uw;
    }
    __syncthreads();  // fn, uv and the warps' partials are complete
    if (tid == 0) {  // this slab's violation and largest u, into every CTA
      float v = 0.0f, um = 1.0f;
      for (int w = 0; w < NW; ++w) v += wred[w], um = fmaxf(um, wumx[w]);
      for (int q = 0; q < cs; ++q) {
        st_async(smem_addr(vred + rank), check ? v : 0.0f, cbar, q);
        st_async(smem_addr(umx + rank), um, cbar, q);
      }
    }
    // Column sums, row group h of column group c4 taking rows h, h + H, ...; group 0 writes
    // csum, the others cpart. The first pass turns the slab into Q on the way.
    for (int e = tid; e < Q4 * H; e += NT) {
      const int c4 = e % Q4, h = e / Q4;
      float4* col = reinterpret_cast<float4*>(Cs) + c4;
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (t == 1) {
#pragma unroll 4
        for (int r = h; r < rows_here; r += H) {
          const float4 c = col[size_t(r) * Q4];
          const float f = fn[r] - la_max;
          const float4 qv = make_float4(exp2f(fmaf(c.x, ns, f)), exp2f(fmaf(c.y, ns, f)), exp2f(fmaf(c.z, ns, f)),
                                        exp2f(fmaf(c.w, ns, f)));
          col[size_t(r) * Q4] = qv;
          s.x += qv.x;
          s.y += qv.y;
          s.z += qv.z;
          s.w += qv.w;
        }
      } else {
#pragma unroll 4
        for (int r = h; r < rows_here; r += H) {
          const float4 qv = col[size_t(r) * Q4];
          const float u = uv[r];
          s.x = fmaf(qv.x, u, s.x);
          s.y = fmaf(qv.y, u, s.y);
          s.z = fmaf(qv.z, u, s.z);
          s.w = fmaf(qv.w, u, s.w);
        }
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
      st_async(smem_addr(cin + rank * Mc + (j - o * Mc)), s, cbar, o);
    }
    mbar_wait(cbar, uint32_t((t - 1) & 1));  // this CTA's column sums, every violation and u max
    if (check) {
      float v = 0.0f;
      for (int q = 0; q < cs; ++q) v += vred[q];
      if (v < a.tol) {
        fres = fv;  // the plan (f, g) is kept, and its scores are already written
        break;
      }
    }
    float ufloor = 1.0f;
    for (int q = 0; q < cs; ++q) ufloor = fmaxf(ufloor, umx[q]);
    ufloor *= 0x1p-64f;
    __syncthreads();  // vred and umx are read before any g, y push lets a peer refill them
    // g of this CTA's columns: L adjacent lanes per column sum the cs slabs' sums in a fixed
    // order (so the result does not depend on timing), and the lane that summed CTA q's sum
    // pushes g and y into CTA q. L divides 32. A sum that may have lost precision is recomputed
    // exactly from C (a rare path; all lanes of the warp take it together).
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
      float lse = la_max + log2f(tot);
      const bool exact = here && !(tot >= ufloor && tot <= 0x1p100f);
      if (__any_sync(0xffffffffu, exact)) {
        Lse st = exact ? col_lse_exact(Cg, n, m, R, cs, j, l, L, ns, fn) : lse_empty();
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
        const float gj = a.kappa_b * (lb - lse), yj = exp2f(gj + la_max - lb_max);
        for (int q = l; q < cs; q += L) {
          st_async(smem_addr(gv + j), gj, ybar, q);
          st_async(smem_addr(yv + j), yj, ybar, q);
        }
      }
    }
    // No barrier: a peer pushes into cin again only after it has every g and y of this
    // iteration, which this CTA sends after reading cin; likewise for vred, umx, gv and yv.
    ++ysent;
    fres = fn;
  }
  if (ysent > ywaited) mbar_wait(ybar, uint32_t(ywaited & 1));  // no push may land after exit

  // 3. Outputs, back in natural units. Scores leave only now: a global store inside the loop
  //    would make every cluster barrier's release wait for it.
  __syncthreads();  // the last row pass's scl (written by other warps)
  if (a.score)
    for (int r = tid; r < rows_here; r += NT) {
      a.score[sg.row_off + i0 + r] = scl[r];
      if (a.kept) *cluster.map_shared_rank(sc_all + i0 + r, 0) = scl[r];
    }
  if (a.f)
    for (int r = tid; r < rows_here; r += NT) a.f[sg.row_off + i0 + r] = fres[r] * a.eps * kLn2;
  if (a.g)
    for (int j = j0 + tid; j < j1; j += NT) a.g[sg.col_off + j] = gv[j] * a.eps * kLn2;
  cluster.sync();  // the scores have reached CTA 0; no CTA leaves while others may touch its memory
  if (a.kept && rank == 0) select_block<NT>(sc_all, sg.sel, a.kept);
#endif
}

}  // namespace detail
}  // namespace topv
