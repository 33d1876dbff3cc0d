// Host side of the framework-free API (topv/topv.h): workspace layout and launch sequences.
// No torch here: this file builds into the torch extension (setup.py) and into the standalone
// library (CMakeLists.txt) alike.

#include <algorithm>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "topv/cost_launch.cuh"
#include "topv/select.cuh"
#include "topv/sinkhorn.cuh"
#include "topv/sinkhorn_cluster.cuh"
#include "topv/topv.h"

namespace topv {
namespace {

using namespace detail;

#define TOPV_TRY(expr)                        \
  do {                                        \
    const cudaError_t topv_err_ = (expr);     \
    if (topv_err_ != cudaSuccess) return topv_err_; \
  } while (0)

constexpr int kRowWarps = 8;

// The GEMM's arguments, with the cost formula's constants (docs/algorithm.md) derived from the
// user's parameters in one place.
GemmArgs gemm_args(const void* S, const void* T, int64_t lds, int64_t ldt, int64_t d, DType dtype, const float* P,
                   const float* Q, int64_t p_rs, int64_t q_rs, float* C, const int* done, const CostParams& c) {
  GemmArgs g{S, T, lds, ldt, d, P, Q, p_rs, q_rs, C, done, 0.5f * c.alpha, c.beta, -1.0f / (2.0f * c.sigma * c.sigma),
             c.gamma};
  g.dtype = dtype;
  return g;
}

int sm_count() {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// Calls launch(table, count) for each run of <= kMaxSegmentsPerLaunch items, copied into the
// table that the kernels take by value; stops at the first error.
template <class Table, class Item, class Launch>
cudaError_t for_each_table(const std::vector<Item>& items, Launch&& launch) {
  Table tab;
  for (size_t base = 0; base < items.size(); base += kMaxSegmentsPerLaunch) {
    const int cnt = int(std::min<size_t>(kMaxSegmentsPerLaunch, items.size() - base));
    std::copy(items.begin() + base, items.begin() + base + cnt, tab.seg);
    TOPV_TRY(launch(tab, cnt));
  }
  return cudaSuccess;
}

// Largest rows / cols of a launch's segments (grid extents).
template <class Seg, class Size>
int max_of(const Seg* seg, int cnt, Size size) {
  int v = 1;
  for (int k = 0; k < cnt; ++k) v = std::max(v, size(seg[k]));
  return v;
}

// ------------------------------------------------------------------ launches

template <typename T>
cudaError_t launch_prep(const CheckMat& a, const CheckMat& b, int64_t d, const float* pos, int64_t pos_elems,
                        int* nonfinite, unsigned* clear, int64_t clear_words, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = d % V == 0 && a.row_stride % V == 0 && b.row_stride % V == 0 &&
                   reinterpret_cast<uintptr_t>(a.data) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data) % 16 == 0;
  // Unchecked: just enough blocks to clear the state.
  const int64_t rows = nonfinite ? std::max<int64_t>({a.rows, b.rows, (pos_elems + 1) / 2}) : 8 * std::min<int64_t>((clear_words + 255) / 256, 64);
  dim3 grid(unsigned(std::max<int64_t>((rows + 7) / 8, 1)), nonfinite ? 2 : 1);
  prep_kernel<T><<<grid, 256, 0, st>>>(a, b, d, vec, pos, pos_elems, nonfinite, clear, clear_words);
  return cudaGetLastError();
}

cudaError_t launch_prep_dt(DType dt, const CheckMat& a, const CheckMat& b, int64_t d, const float* pos,
                           int64_t pos_elems, int* nonfinite, unsigned* clear, int64_t clear_words, cudaStream_t st) {
  switch (dt) {
    case DType::kFloat32: return launch_prep<float>(a, b, d, pos, pos_elems, nonfinite, clear, clear_words, st);
    case DType::kFloat16: return launch_prep<__half>(a, b, d, pos, pos_elems, nonfinite, clear, clear_words, st);
    case DType::kBFloat16:
      return launch_prep<__nv_bfloat16>(a, b, d, pos, pos_elems, nonfinite, clear, clear_words, st);
  }
  return cudaErrorInvalidValue;
}

// The cost GEMM over `segs` (<= kMaxSegmentsPerLaunch per launch). PARTIAL (16-bit inputs only):
// split-K partial dot products and sums of squares, which cost_reduce_kernel turns into C.
template <typename T>
cudaError_t launch_gemm_t(const GemmArgs& ga, const std::vector<GemmSeg>& segs, bool partial, cudaStream_t st) {
  return for_each_table<GemmTable>(segs, [&](const GemmTable& tab, int cnt) {
    const int max_r = max_of(tab.seg, cnt, [](const GemmSeg& g) { return g.rows; });
    const int max_c = max_of(tab.seg, cnt, [](const GemmSeg& g) { return g.cols; });
    if constexpr (std::is_same<T, float>::value) {
      if (partial) return cudaErrorInvalidValue;
      dim3 grid(unsigned((max_c + 63) / 64), unsigned((max_r + 63) / 64), unsigned(cnt));
      cost_gemm_f32_kernel<<<grid, 256, 0, st>>>(ga, tab);
      return cudaGetLastError();
    } else {
      const bool vec = ga.d % 8 == 0 && ga.lds % 8 == 0 && ga.ldt % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(ga.S) % 16 == 0 && reinterpret_cast<uintptr_t>(ga.T) % 16 == 0 &&
                       std::all_of(tab.seg, tab.seg + cnt, [](const GemmSeg& s) { return s.s_off % 8 == 0 && s.t_off % 8 == 0; });
      return partial ? launch_cost_gemm_tc<T, true>(ga, tab, cnt, max_r, max_c, vec, sm_count(), st)
                     : launch_cost_gemm_tc<T, false>(ga, tab, cnt, max_r, max_c, vec, sm_count(), st);
    }
  });
}

cudaError_t launch_gemm(DType dt, const GemmArgs& ga, const std::vector<GemmSeg>& segs, bool partial,
                        cudaStream_t st) {
  switch (dt) {
    case DType::kFloat32: return launch_gemm_t<float>(ga, segs, partial, st);
    case DType::kFloat16: return launch_gemm_t<__half>(ga, segs, partial, st);
    case DType::kBFloat16: return launch_gemm_t<__nv_bfloat16>(ga, segs, partial, st);
  }
  return cudaErrorInvalidValue;
}

// One block per row of a segment: the row's norm once, float4 columns where the layout allows.
cudaError_t launch_cost_reduce(const GemmArgs& ga, const std::vector<GemmSeg>& segs, cudaStream_t st) {
  return for_each_table<GemmTable>(segs, [&](const GemmTable& tab, int cnt) {
    const int max_r = max_of(tab.seg, cnt, [](const GemmSeg& g) { return g.rows; });
    cost_reduce_kernel<<<dim3(unsigned(max_r), unsigned(cnt)), kReduceThreads, 0, st>>>(ga, tab);
    return cudaGetLastError();
  });
}

// ------------------------------------------------------------------ on-chip (cluster) Sinkhorn

struct ClusterPlan {
  int cs = 0;  // 0: the pass kernels
  size_t smem = 0;
};

// Per device: sm_90+ (clusters) and the kernel's attributes set (a function attribute, not a
// stream operation, so this is fine during graph capture). Returns the dynamic shared memory limit.
size_t cluster_setup(int dev) {
  static std::mutex mu;
  static std::map<int, size_t> limit;
  std::lock_guard<std::mutex> lock(mu);
  auto it = limit.find(dev);
  if (it != limit.end()) return it->second;
  int major = 0, optin = 0;
  size_t lim = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess) {
    cudaFuncAttributes fa{};
    // ptxVersion: a build without sm_90 code (say 8.0+PTX, JIT-compiled here) has an empty body.
    if (cudaFuncGetAttributes(&fa, sinkhorn_cluster_kernel) == cudaSuccess && fa.ptxVersion >= 90 &&
        size_t(optin) > fa.sharedSizeBytes) {
      lim = size_t(optin) - fa.sharedSizeBytes;
      if (cudaFuncSetAttribute(sinkhorn_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(lim)) !=
              cudaSuccess ||
          cudaFuncSetAttribute(sinkhorn_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
              cudaSuccess)
        lim = 0;
    }
  }
  cudaGetLastError();  // a failed query only means "no on-chip path"
  limit[dev] = lim;
  return lim;
}

cudaLaunchConfig_t cluster_config(dim3 grid, int cs, size_t smem, cudaStream_t st, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kClusterThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = unsigned(cs);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

int max_active_clusters(int dev, int cs, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, cs, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(dim3(unsigned(cs), 1), cs, smem, nullptr, &attr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, sinkhorn_cluster_kernel, &cfg) != cudaSuccess) n = 0;
  cudaGetLastError();
  cache[key] = n;
  return n;
}

// The cluster size for `nseg` segments of up to n x m: the one with the least work per CTA times
// waves of clusters, among those whose slab fits in shared memory (ties: the smaller cluster,
// fewer remote accesses per barrier).
ClusterPlan plan_cluster(int64_t nseg, int64_t n, int64_t m, int max_cluster) {
  ClusterPlan best;
  int dev = 0;
  if (max_cluster < 1 || cudaGetDevice(&dev) != cudaSuccess) return best;
  const size_t limit = cluster_setup(dev);
  long long best_est = LLONG_MAX;
  for (int cs = 1; cs <= std::min(max_cluster, kMaxCluster); cs *= 2) {
    if (cs > 1 && cs > n) break;
    const size_t smem = cluster_smem_floats(int(n), int(m), cs) * sizeof(float);
    if (smem > limit) continue;
    const int active = max_active_clusters(dev, cs, smem);
    if (active < 1) continue;
    const long long waves = (nseg + active - 1) / active;
    const long long est = waves * ((n + cs - 1) / cs) * m;
    if (est < best_est) {
      best_est = est;
      best = ClusterPlan{cs, smem};
    }
  }
  return best;
}

// With ca.ready, a programmatic dependent launch: the kernel may start while the GEMM before it
// runs (see launch_dependents in cost.cuh) and takes each segment once its C is complete, so the
// clusters fill the SMs that the GEMM's last wave leaves idle.
cudaError_t launch_cluster(const ClusterArgs& ca, const std::vector<ClusterSeg>& segs, const ClusterPlan& plan,
                           cudaStream_t st) {
  return for_each_table<ClusterTable>(segs, [&](const ClusterTable& tab, int cnt) {
    cudaLaunchAttribute attr[2];
    cudaLaunchConfig_t cfg = cluster_config(dim3(unsigned(plan.cs), unsigned(cnt)), plan.cs, plan.smem, st, attr);
    if (ca.ready) {
      attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[1].val.programmaticStreamSerializationAllowed = 1;
      cfg.numAttrs = 2;
    }
    return cudaLaunchKernelEx(&cfg, sinkhorn_cluster_kernel, ca, tab);
  });
}

// One Sinkhorn pass (row kernel, then the column kernel when `col` is set) over <= kMax segments.
cudaError_t launch_pass(const RowArgs& ra, const ColArgs* ca, const std::vector<SkSeg>& segs, cudaStream_t st) {
  return for_each_table<SkTable>(segs, [&](const SkTable& tab, int cnt) {
    const int max_r = max_of(tab.seg, cnt, [](const SkSeg& g) { return g.r1 - g.r0; });
    const int max_c = max_of(tab.seg, cnt, [](const SkSeg& g) { return g.cols; });
    sk_row_kernel<kRowWarps><<<dim3(unsigned((max_r + kRowWarps - 1) / kRowWarps), unsigned(cnt)), kRowWarps * 32, 0, st>>>(ra, tab);
    TOPV_TRY(cudaGetLastError());
    if (ca) sk_col_kernel<<<dim3(unsigned((max_c + 31) / 32), unsigned(cnt)), 256, 0, st>>>(*ca, tab);
    return cudaGetLastError();
  });
}

// ------------------------------------------------------------------ prune layout

struct Group {
  int64_t first, count;
  bool streaming;      // one segment whose cost does not fit: row chunks recomputed every pass
  int64_t chunk_rows;  // streaming only
  int64_t c_elems;     // cost buffer elements this group needs (per split)
  int64_t max_n;
  ClusterPlan cluster;  // cs > 0: the cluster kernel runs Sinkhorn and selection on chip
  int splits = 1;       // > 1: the GEMM writes split-K partials that cost_reduce_kernel sums into C
};

std::vector<Group> make_groups(const PruneArgs& a, size_t cap_bytes) {
  const int64_t cap = std::max<int64_t>(int64_t(cap_bytes / sizeof(float)), 1);
  std::vector<Group> out;
  int64_t k = 0;
  while (k < a.num_segments) {
    const int64_t n = a.seg_lens[k];
    if (n * n > cap) {
      int64_t rows = std::max<int64_t>(cap / n, 1);
      if (rows >= 128) rows -= rows % 128;
      out.push_back({k, 1, true, rows, rows * n, n});
      ++k;
      continue;
    }
    Group g{k, 0, false, 0, 0, 0};
    while (k < a.num_segments && g.count < kMaxSegmentsPerLaunch) {
      const int64_t nk = a.seg_lens[k];
      if (nk * nk > cap || g.c_elems + nk * nk > cap) break;
      g.c_elems += nk * nk;
      g.max_n = std::max(g.max_n, nk);
      ++g.count;
      ++k;
    }
    g.cluster = plan_cluster(g.count, g.max_n, g.max_n, a.sinkhorn.max_cluster);
    if (g.cluster.cs > 0 && a.dtype != DType::kFloat32) {
      int sp = cost_gemm_tc_splits(int(g.count), int(g.max_n), int(g.max_n), a.d, sm_count());
      while (sp > 1 && g.c_elems * sp > cap) --sp;
      g.splits = std::max(sp, 1);
    }
    out.push_back(g);
  }
  return out;
}

struct PruneWs {
  float *f, *g, *fnew, *viol, *colmax, *colsum, *C, *sq;
  int* done;
  int* ready;  // per segment: C elements stored so far (by the on-chip groups' GEMM or split-K reduction)
  size_t bytes;
};

PruneWs prune_layout(const PruneArgs& a, const std::vector<Group>& groups, void* base) {
  Carver cv{static_cast<char*>(base)};
  const size_t T = size_t(a.total_rows);
  PruneWs w{};
  // f, g and done are adjacent so the first kernel clears them in one sweep.
  w.f = cv.take<float>(2 * T);
  w.g = w.f ? w.f + T : nullptr;
  w.done = cv.take<int>(size_t(a.num_segments));
  w.ready = cv.take<int>(size_t(a.num_segments));
  w.fnew = cv.take<float>(T);
  w.viol = cv.take<float>(T);
  w.colmax = cv.take<float>(T);
  w.colsum = cv.take<float>(T);
  int64_t c = 1, splits = 0;
  for (const Group& g : groups) {
    c = std::max(c, g.c_elems * g.splits);
    if (g.splits > 1) splits = std::max<int64_t>(splits, g.splits);
  }
  w.C = cv.take<float>(size_t(c));
  w.sq = cv.take<float>(size_t(splits) * 2 * T);
  w.bytes = cv.used;
  return w;
}

}  // namespace

// ------------------------------------------------------------------ cost_matrix

size_t cost_matrix_workspace_size(const CostArgs&) { return 0; }  // norms are computed in the GEMM

cudaError_t cost_matrix(const CostArgs& a, float* out, void*, size_t, cudaStream_t st) {
  if (!cost_args_ok(a)) return cudaErrorInvalidValue;
  const GemmArgs ga = gemm_args(a.source, a.target, a.source_row_stride, a.target_row_stride, a.d, a.dtype, a.src_pos,
                                a.tgt_pos, a.src_pos_row_stride, a.tgt_pos_row_stride, out, nullptr, a.cost);
  std::vector<GemmSeg> segs(size_t(a.batch));
  for (int64_t b = 0; b < a.batch; ++b)
    segs[b] = GemmSeg{b * a.source_batch_stride, b * a.target_batch_stride, b * a.n * a.m,
                      int(b * a.src_pos_batch_stride), int(b * a.tgt_pos_batch_stride), int(a.n), int(a.m), int(b)};
  return launch_gemm(a.dtype, ga, segs, false, st);
}

// ------------------------------------------------------------------ sinkhorn

size_t sinkhorn_workspace_size(const SinkhornArgs& a) {
  Carver cv{nullptr};
  cv.take<float>(size_t(a.batch * a.n));  // fnew
  cv.take<float>(size_t(a.batch * a.n));  // viol
  cv.take<float>(size_t(a.batch * a.m));  // colmax
  cv.take<float>(size_t(a.batch * a.m));  // colsum
  cv.take<int>(size_t(a.batch));          // done
  return cv.used;
}

cudaError_t sinkhorn(const SinkhornArgs& a, float* f, float* g, void* workspace, size_t workspace_bytes,
                     cudaStream_t st) {
  const SinkhornParams& p = a.sinkhorn;
  if (!sinkhorn_args_ok(a) || workspace_bytes < sinkhorn_workspace_size(a)) return cudaErrorInvalidValue;
  const float ka = kappa(a.tau_a, p.eps), ra = rho(a.tau_a, p.eps), kb = kappa(a.tau_b, p.eps);
  const ClusterPlan plan = plan_cluster(a.batch, a.n, a.m, p.max_cluster);
  if (plan.cs > 0) {
    const ClusterArgs ca{a.cost, a.log_a, a.log_b, f, g, nullptr, nullptr, nullptr, p.eps, p.tol, p.n_iters,
                         ka, ra, kb};
    std::vector<ClusterSeg> segs(size_t(a.batch));
    for (int64_t b = 0; b < a.batch; ++b)
      segs[b] = ClusterSeg{b * a.n * a.m, int(a.n), int(a.m), int(b * a.n), int(b * a.m), int(b), SelSeg{}};
    return launch_cluster(ca, segs, plan, st);
  }
  Carver cv{static_cast<char*>(workspace)};
  float* fnew = cv.take<float>(size_t(a.batch * a.n));
  float* viol = cv.take<float>(size_t(a.batch * a.n));
  float* colmax = cv.take<float>(size_t(a.batch * a.m));
  float* colsum = cv.take<float>(size_t(a.batch * a.m));
  int* done = cv.take<int>(size_t(a.batch));
  TOPV_TRY(cudaMemsetAsync(f, 0, sizeof(float) * a.batch * a.n, st));
  TOPV_TRY(cudaMemsetAsync(g, 0, sizeof(float) * a.batch * a.m, st));
  TOPV_TRY(cudaMemsetAsync(done, 0, sizeof(int) * a.batch, st));
  std::vector<SkSeg> segs(size_t(a.batch));
  for (int64_t b = 0; b < a.batch; ++b)
    segs[b] = SkSeg{b * a.n * a.m, int(a.n), int(a.m), int(b * a.n), int(b * a.m), 0, int(a.n), int(b)};
  const bool tol = p.tol > 0;
  for (int t = 1; t <= p.n_iters; ++t) {
    const bool check = tol && t >= 2;
    const RowArgs rw{a.cost, g, f, fnew, check ? viol : nullptr, nullptr, a.log_a, done, p.eps, ka, ra};
    const ColArgs cl{a.cost, fnew, f, g, colmax, colsum, a.log_b, done, viol, p.eps, p.tol, kb, 1, 1, check ? 1 : 0};
    TOPV_TRY(launch_pass(rw, &cl, segs, st));
  }
  return cudaSuccess;
}

// ------------------------------------------------------------------ prune

size_t default_cost_buffer_cap() {
  size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
    cudaGetLastError();
    free_bytes = 0;
  }
  return std::max(kDefaultCostBufferCap, size_t(kCostBufferFreeFraction * double(free_bytes)));
}

size_t prune_workspace_size(const PruneArgs& a, size_t cap) {
  if (!prune_args_ok(a)) return 0;
  return prune_layout(a, make_groups(a, cap), nullptr).bytes;
}

cudaError_t prune(const PruneArgs& a, int64_t* kept, float* scores, int* nonfinite, void* workspace,
                  size_t workspace_bytes, cudaStream_t st, size_t cap) {
  if (!prune_args_ok(a)) return cudaErrorInvalidValue;
  const std::vector<Group> groups = make_groups(a, cap);
  if (workspace_bytes < prune_layout(a, groups, nullptr).bytes) return cudaErrorInvalidValue;
  const PruneWs w = prune_layout(a, groups, workspace);
  const SinkhornParams& p = a.sinkhorn;
  const int64_t S = a.num_segments, T = a.total_rows;

  // The pass kernels need cleared potentials and done flags; the cluster kernel starts from
  // registers and shared memory, so an unchecked all-cluster call launches no prep kernel.
  const bool any_pass = std::any_of(groups.begin(), groups.end(), [](const Group& g) { return g.cluster.cs == 0; });
  if (a.check_finite || any_pass) {
    const int64_t clear_words = any_pass ? (reinterpret_cast<char*>(w.done + S) - reinterpret_cast<char*>(w.f)) / 4 : 0;
    if (a.check_finite) TOPV_TRY(cudaMemsetAsync(nonfinite, 0, sizeof(int), st));
    const CheckMat ms{a.source, a.source_row_stride, T}, mt{a.target, a.target_row_stride, T};
    TOPV_TRY(launch_prep_dt(a.dtype, ms, mt, a.d, a.positions, a.position_rows * 2,
                            a.check_finite ? nonfinite : nullptr, reinterpret_cast<unsigned*>(w.f), clear_words, st));
  }

  std::vector<int64_t> start(static_cast<size_t>(S)), out_start(static_cast<size_t>(S));
  for (int64_t k = 0, r = 0, o = 0; k < S; r += a.seg_lens[k], o += a.keep[k], ++k) {
    start[k] = r;
    out_start[k] = o;
  }
  auto sel_seg = [&](int64_t k) {
    const int64_t keep = a.keep[k];
    const int k_rec = int(std::floor(a.recover_ratio * double(keep)));
    return SelSeg{start[k], a.padded ? 0 : start[k], out_start[k], int(a.seg_lens[k]), int(keep), k_rec};
  };
  const bool shared_pos = a.position_rows != a.total_rows;
  // Float offset of the position of packed row `row`, which is row `local` of its segment.
  auto pos_off = [&](int64_t row, int64_t local) { return int(2 * (shared_pos ? local : row)); };
  const GemmArgs ga = gemm_args(a.source, a.target, a.source_row_stride, a.target_row_stride, a.d, a.dtype,
                                a.positions, a.positions, 2, 2, w.C, w.done, a.cost);
  const bool tol = p.tol > 0;
  const float ka = kappa(a.tau, p.eps), ra = rho(a.tau, p.eps);
  auto row_args = [&](int t) {
    return RowArgs{w.C, w.g, w.f, w.fnew, tol && t >= 2 ? w.viol : nullptr, scores, nullptr, w.done, p.eps, ka, ra};
  };
  auto col_args = [&](int t, bool first, bool last) {
    return ColArgs{w.C, w.fnew, w.f, w.g, w.colmax, w.colsum, nullptr, w.done, w.viol, p.eps, p.tol, 1.0f,
                   first ? 1 : 0, last ? 1 : 0, tol && t >= 2 ? 1 : 0};
  };

  // The GEMM segments of a non-streaming group, their costs one after another in the buffer.
  auto gemm_segs = [&](const Group& grp) {
    std::vector<GemmSeg> gs;
    long long c_off = 0;
    for (int64_t k = grp.first; k < grp.first + grp.count; ++k) {
      const int n = int(a.seg_lens[k]);
      const int64_t r = start[k];
      gs.push_back(GemmSeg{r * a.source_row_stride, r * a.target_row_stride, c_off, pos_off(r, 0), pos_off(r, 0), n,
                           n, int(k), int(r)});
      c_off += (long long)n * n;
    }
    return gs;
  };

  std::vector<SelSeg> sel;  // segments the pass kernels scored: selected by select_kernel at the end
  for (const Group& grp : groups) {
    if (grp.cluster.cs > 0) {
      // C of every segment of the group: straight from the GEMM, or (split-K, when the tiles
      // alone do not fill the GPU) from partials that the reduction kernel turns into C. (Summing
      // them in the cluster kernel's slab load instead was slower: 16 SMs do that work.)
      GemmArgs gp = ga;
      gp.done = nullptr;  // the done flags are the pass kernels' (and not cleared here)
      const bool partial = grp.splits > 1;
      if (partial) {
        gp.sq_s = w.sq;
        gp.sq_t = w.sq + T;
        gp.sq_stride = 2 * T;
        gp.part_stride = grp.c_elems;
        gp.splits = grp.splits;
      }
      const std::vector<GemmSeg> gs = gemm_segs(grp);
      std::vector<ClusterSeg> cseg;  // sq_off is the segment's first packed row
      for (const GemmSeg& g : gs)
        cseg.push_back(ClusterSeg{g.c_off, g.rows, g.cols, g.sq_off, g.sq_off, g.id, sel_seg(g.id)});
      // The cluster kernel overlaps the kernel that writes C (the GEMM, or the split-K reduction),
      // ordered per segment by w.ready (launch_cluster).
      TOPV_TRY(cudaMemsetAsync(w.ready + grp.first, 0, sizeof(int) * size_t(grp.count), st));
      gp.ready = w.ready;
      TOPV_TRY(launch_gemm(a.dtype, gp, gs, partial, st));
      if (partial) TOPV_TRY(launch_cost_reduce(gp, gs, st));
      const ClusterArgs ca{w.C,   nullptr, nullptr, nullptr,   nullptr, scores, kept, gp.ready,
                           p.eps, p.tol,   p.n_iters, ka,   ra,      1.0f};
      TOPV_TRY(launch_cluster(ca, cseg, grp.cluster, st));
      continue;
    }
    for (int64_t k = grp.first; k < grp.first + grp.count; ++k) sel.push_back(sel_seg(k));
    if (!grp.streaming) {
      const std::vector<GemmSeg> gs = gemm_segs(grp);
      std::vector<SkSeg> ss;
      for (const GemmSeg& g : gs) ss.push_back(SkSeg{g.c_off, g.rows, g.cols, g.sq_off, g.sq_off, 0, g.rows, g.id});
      TOPV_TRY(launch_gemm(a.dtype, ga, gs, false, st));
      for (int t = 1; t <= p.n_iters + 1; ++t) {
        const RowArgs ra = row_args(t);
        const ColArgs ca = col_args(t, true, true);
        TOPV_TRY(launch_pass(ra, t <= p.n_iters ? &ca : nullptr, ss, st));
      }
    } else {
      const int64_t k = grp.first;
      const int n = int(a.seg_lens[k]);
      const int64_t r = start[k];
      std::vector<int64_t> chunks;
      for (int64_t c0 = 0; c0 < n; c0 += grp.chunk_rows) chunks.push_back(c0);
      const size_t nc = chunks.size();
      for (int t = 1; t <= p.n_iters + 1; ++t) {
        // Passes alternate the chunk order, so each pass starts on the chunk the previous pass
        // left in the buffer and skips recomputing it.
        for (size_t idx = 0; idx < nc; ++idx) {
          const int64_t c0 = chunks[t % 2 == 1 ? idx : nc - 1 - idx];
          const int c1 = int(std::min<int64_t>(n, c0 + grp.chunk_rows));
          if (t == 1 || idx > 0) {
            const std::vector<GemmSeg> gs{GemmSeg{(r + c0) * a.source_row_stride, r * a.target_row_stride, 0,
                                                  pos_off(r + c0, c0), pos_off(r, 0), c1 - int(c0), n, int(k)}};
            TOPV_TRY(launch_gemm(a.dtype, ga, gs, false, st));
          }
          const std::vector<SkSeg> ss{SkSeg{0, n, n, int(r), int(r), int(c0), c1, int(k)}};
          const RowArgs ra = row_args(t);
          const ColArgs ca = col_args(t, idx == 0, idx + 1 == nc);
          TOPV_TRY(launch_pass(ra, t <= p.n_iters ? &ca : nullptr, ss, st));
        }
      }
    }
  }

  return for_each_table<SelTable>(sel, [&](const SelTable& tab, int cnt) {
    select_kernel<1024><<<cnt, 1024, 0, st>>>(scores, tab, kept);
    return cudaGetLastError();
  });
}

}  // namespace topv
