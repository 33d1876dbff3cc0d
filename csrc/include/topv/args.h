// topv: the argument structures of the framework-free C++ APIs (no CUDA, no torch): the CUDA
// kernels take them through topv/topv.h, the C++ CPU kernels through topv/topv_cpu.h. The math is
// docs/algorithm.md.
//
// Layout conventions
// * Features: row r of a (rows, d) matrix starts at data + r * row_stride (elements); the d
//   elements of a row are contiguous. float32, float16 or bfloat16.
// * Positions: float32 (row, col) pairs, pair r at ptr + r * row_stride (floats).
// * Pointers are device pointers for the CUDA API and host pointers for the CPU API.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace topv {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Defaults: the same values as topv/defaults.py (tests/test_defaults.py checks them).
struct CostParams {
  float alpha = 1.0f, beta = 1.0f, gamma = 0.1f, sigma = 0.2f;
};

struct SinkhornParams {
  float eps = 0.1f;
  int n_iters = 3;
  float tol = 0.0f;  // > 0: per-segment early exit on the relaxed row violation (docs/algorithm.md)
  // Largest thread-block cluster the on-chip path may use (sm_90+: one cluster per segment, the
  // whole loop in one launch, when the segment's cost fits in the cluster's shared memory);
  // 0 forces the pass kernels (two launches per iteration, cost in global memory).
  int max_cluster = 16;
};

// Batched cost matrix: out (batch, n, m) fp32 row-major, out[b] = C(source[b], target[b]).
struct CostArgs {
  const void* source;  // batch b, row i at source + b * source_batch_stride + i * source_row_stride
  const void* target;
  DType dtype;
  int64_t batch, n, m, d;
  int64_t source_batch_stride, source_row_stride, target_batch_stride, target_row_stride;
  const float* src_pos;  // pair (b, i) at src_pos + b * src_pos_batch_stride + i * src_pos_row_stride
  const float* tgt_pos;
  int64_t src_pos_batch_stride, src_pos_row_stride, tgt_pos_batch_stride, tgt_pos_row_stride;
  CostParams cost;
};

// Batched log-domain Sinkhorn on cost (batch, n, m) fp32 contiguous; log marginals (batch, n) /
// (batch, m) contiguous or nullptr for uniform. Writes potentials f (batch, n), g (batch, m).
// tau_a / tau_b: the KL weights of the source / target marginal (> 0; INFINITY keeps it exact, so
// the defaults are balanced OT).
struct SinkhornArgs {
  const float* cost;
  int64_t batch, n, m;
  const float* log_a;
  const float* log_b;
  SinkhornParams sinkhorn;
  float tau_a = INFINITY, tau_b = INFINITY;
};

// TopV prune on packed segments. source/target (T, d); segment k holds rows
// [start_k, start_k + seg_lens[k]). positions (T, 2), or, with `padded` and position_rows ==
// seg_lens[0], one (n, 2) table shared by every segment. Outputs: kept (sum(keep),) int64,
// ascending within each segment (indices local to the segment when `padded`, else into the
// packed rows); scores (T,) fp32; nonfinite (1,) int32, set nonzero when a feature or position is
// not finite (written only when check_finite; the caller checks it after the call). Semi-relaxed
// OT: the source marginal carries the KL weight tau (> 0; INFINITY: balanced), the target's is exact.
struct PruneArgs {
  const void* source;
  const void* target;
  DType dtype;
  int64_t total_rows, d, source_row_stride, target_row_stride;
  const float* positions;
  int64_t position_rows;
  const int64_t* seg_lens;  // host arrays of num_segments entries
  const int64_t* keep;
  int64_t num_segments;
  bool padded;
  CostParams cost;
  SinkhornParams sinkhorn;
  float tau = 0.1f;
  double recover_ratio = 0.25;  // double: k_rec = floor(recover_ratio * keep) must match Python exactly
  bool check_finite = true;
};

// The argument checks every entry point makes (the CUDA and the CPU API alike).
inline bool relaxation_ok(float tau) { return tau > 0; }  // inf allowed; NaN fails

inline bool cost_args_ok(const CostArgs& a) {
  return a.source && a.target && a.src_pos && a.tgt_pos && a.batch >= 1 && a.n >= 1 && a.m >= 1 && a.d >= 1 &&
         a.batch * (a.n > a.m ? a.n : a.m) < (int64_t(1) << 31);
}

inline bool sinkhorn_params_ok(const SinkhornParams& p) { return p.n_iters >= 1 && p.eps > 0 && p.tol >= 0; }  // NaN fails

inline bool sinkhorn_args_ok(const SinkhornArgs& a) {
  return a.cost && a.batch >= 1 && a.n >= 1 && a.m >= 1 && sinkhorn_params_ok(a.sinkhorn) && relaxation_ok(a.tau_a) &&
         relaxation_ok(a.tau_b) && a.batch * (a.n > a.m ? a.n : a.m) < (int64_t(1) << 31);
}

inline bool prune_args_ok(const PruneArgs& a) {
  if (!a.source || !a.target || !a.positions || !a.seg_lens || !a.keep || a.total_rows < 1 || a.d < 1 ||
      a.num_segments < 1)
    return false;
  if (!sinkhorn_params_ok(a.sinkhorn) || !relaxation_ok(a.tau)) return false;
  if (!(a.recover_ratio >= 0 && a.recover_ratio < 1)) return false;
  int64_t total = 0;
  for (int64_t k = 0; k < a.num_segments; ++k) {
    if (a.seg_lens[k] < 1 || a.keep[k] < 1 || a.keep[k] > a.seg_lens[k]) return false;
    if (a.padded && a.seg_lens[k] != a.seg_lens[0]) return false;
    if (a.seg_lens[k] > (int64_t(1) << 30)) return false;
    total += a.seg_lens[k];
  }
  if (total != a.total_rows || a.total_rows >= (int64_t(1) << 31)) return false;
  return a.position_rows == a.total_rows || (a.padded && a.position_rows == a.seg_lens[0]);
}

// The relaxation factors of docs/algorithm.md: kappa = tau / (tau + eps) scales a potential update
// (1 for an exact marginal, tau = inf); rho = eps / tau is the exponent of the relaxed row target.
inline float kappa(double tau, double eps) { return std::isinf(tau) ? 1.0f : float(tau / (tau + eps)); }
inline float rho(double tau, double eps) { return std::isinf(tau) ? 0.0f : float(eps / tau); }

}  // namespace topv
