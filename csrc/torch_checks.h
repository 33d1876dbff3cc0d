// Argument checks, layout handling and the framework-free argument structures (topv/args.h) of the
// native ops' torch launchers, shared by the CPU (topv_cpu.cpp) and CUDA (topv_cuda.cu) kernels:
// each launcher checks its device, then calls these and hands the structures to its API. Every message names the backend (`who`) and says
// what came. The Python ops check the same things earlier with friendlier messages; these guard
// C++ callers of torch.ops.topv.*_native.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "topv/args.h"

namespace topv_torch {

inline topv::DType feature_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return topv::DType::kFloat16;
    case at::kBFloat16: return topv::DType::kBFloat16;
    default: return topv::DType::kFloat32;  // check_features admits nothing else
  }
}

inline at::Tensor unit_last(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

inline void check_features(const at::Tensor& x, const char* who, const char* name) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, who, ": ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

inline void check_pair(const at::Tensor& source, const at::Tensor& target, const char* who) {
  check_features(source, who, "source");
  check_features(target, who, "target");
  TORCH_CHECK(target.scalar_type() == source.scalar_type(), who, ": source and target dtypes differ: ",
              source.scalar_type(), " vs ", target.scalar_type());
}

struct CostShape {
  int64_t B, n, m, d;
};

// source (B, n, d), target (B, m, d), src_pos (B, n, 2) and tgt_pos (B, m, 2) float32.
inline CostShape check_cost_matrix(const at::Tensor& source, const at::Tensor& target, const at::Tensor& src_pos,
                                   const at::Tensor& tgt_pos, const char* who) {
  check_pair(source, target, who);
  TORCH_CHECK(source.dim() == 3 && target.dim() == 3, who, ": source/target must be (B, n, d)/(B, m, d), got ",
              source.sizes(), " and ", target.sizes());
  const CostShape c{source.size(0), source.size(1), target.size(1), source.size(2)};
  TORCH_CHECK(target.size(0) == c.B && target.size(2) == c.d && c.B >= 1 && c.n >= 1 && c.m >= 1 && c.d >= 1, who,
              ": target ", target.sizes(), " does not match source ", source.sizes());
  TORCH_CHECK(src_pos.sizes() == at::IntArrayRef({c.B, c.n, 2}) && src_pos.scalar_type() == at::kFloat, who,
              ": src_pos must be float32 (", c.B, ", ", c.n, ", 2), got ", src_pos.scalar_type(), " ", src_pos.sizes());
  TORCH_CHECK(tgt_pos.sizes() == at::IntArrayRef({c.B, c.m, 2}) && tgt_pos.scalar_type() == at::kFloat, who,
              ": tgt_pos must be float32 (", c.B, ", ", c.m, ", 2), got ", tgt_pos.scalar_type(), " ", tgt_pos.sizes());
  return c;
}

// cost (B, n, m) float32, log marginals (B, n) / (B, m) float32; returns them contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> check_sinkhorn(const at::Tensor& cost,
                                                                    const std::optional<at::Tensor>& log_a,
                                                                    const std::optional<at::Tensor>& log_b, double eps,
                                                                    int64_t n_iters, double tol, double tau_a,
                                                                    double tau_b, const char* who) {
  TORCH_CHECK(cost.scalar_type() == at::kFloat && cost.dim() == 3 && cost.numel() > 0, who,
              ": cost must be a non-empty float32 (B, n, m) tensor, got ", cost.scalar_type(), " ", cost.sizes());
  TORCH_CHECK(eps > 0 && n_iters >= 1 && tol >= 0 && tau_a > 0 && tau_b > 0, who,
              ": need eps > 0, n_iters >= 1, tol >= 0, tau_a > 0, tau_b > 0; got eps=", eps, " n_iters=", n_iters,
              " tol=", tol, " tau_a=", tau_a, " tau_b=", tau_b);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  at::Tensor la, lb;
  for (auto [w, rows, name, out] : {std::make_tuple(&log_a, n, "log_a", &la), std::make_tuple(&log_b, m, "log_b", &lb)}) {
    if (!*w) continue;
    TORCH_CHECK((*w)->device() == cost.device(), who, ": ", name, " is on ", (*w)->device(), " but cost is on ",
                cost.device());
    TORCH_CHECK((*w)->sizes() == at::IntArrayRef({B, rows}) && (*w)->scalar_type() == at::kFloat, who, ": ", name,
                " must be float32 (", B, ", ", rows, "), got ", (*w)->scalar_type(), " ", (*w)->sizes());
    *out = (*w)->contiguous();
  }
  return {cost.contiguous(), la, lb};
}

// A prune call as the kernels take it: rows (T, d) with unit stride on d, positions float32
// contiguous (T, 2) or, for a padded batch, the shared (n, 2).
struct PruneCall {
  at::Tensor src, tgt, pos;
  int64_t T = 0, total_keep = 0;
  bool batched = false;  // a padded (B, n, d) input: outputs are shaped (B, keep) / (B, n)
  int64_t B = 0, n = 0, keep0 = 0;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> shaped(at::Tensor kept, at::Tensor scores,
                                                        at::Tensor nonfinite) const {
    if (batched) return {kept.view({B, keep0}), scores.view({B, n}), nonfinite};
    return {kept, scores, nonfinite};
  }
};

// (B, n, d) or packed (T, d) rows -> (T, d) with unit stride on d: a view where the rows are evenly
// strided, else one copy.
inline at::Tensor packed_rows(const at::Tensor& x) {
  at::Tensor y = x.dim() == 3 && x.stride(0) != x.size(1) * x.stride(1) ? x.contiguous() : x;
  y = y.reshape({-1, y.size(-1)});
  return y.stride(1) == 1 ? y : y.contiguous();
}

// Source / target packed (T, d), or a padded (B, n, d) batch; positions (T, 2), or with `padded`
// the shared (n, 2) or per-row (B, n, 2).
inline PruneCall check_prune(const at::Tensor& source, const at::Tensor& target, const at::Tensor& positions,
                             at::IntArrayRef seg_lens, at::IntArrayRef keep, bool padded, double eps, double tau,
                             int64_t n_iters, double tol, double recover_ratio, const char* who) {
  check_pair(source, target, who);
  TORCH_CHECK((source.dim() == 2 || (padded && source.dim() == 3)) && target.sizes() == source.sizes() &&
                  source.size(-1) >= 1,
              who, ": source/target must be packed (T, d)", padded ? " or padded (B, n, d)" : "",
              " of one shape, got ", source.sizes(), " and ", target.sizes());
  PruneCall c;
  c.batched = source.dim() == 3;
  c.T = c.batched ? source.size(0) * source.size(1) : source.size(0);
  const int64_t S = static_cast<int64_t>(seg_lens.size());
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(keep.size()) == S, who, ": need one keep per segment, got ", S,
              " segments and ", keep.size(), " budgets");
  int64_t total = 0;
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(seg_lens[k] >= 1 && keep[k] >= 1 && keep[k] <= seg_lens[k], who, ": segment ", k, " has length ",
                seg_lens[k], " and keep ", keep[k], "; need 1 <= keep <= length");
    TORCH_CHECK(!padded || (seg_lens[k] == seg_lens[0] && keep[k] == keep[0]), who,
                ": padded segments must have equal lengths and budgets, got ", seg_lens, " and ", keep);
    total += seg_lens[k];
    c.total_keep += keep[k];
  }
  TORCH_CHECK(total == c.T, who, ": seg_lens sum to ", total, " but source has T=", c.T, " rows");
  TORCH_CHECK(!c.batched || (source.size(0) == S && source.size(1) == seg_lens[0]), who, ": a padded source ",
              source.sizes(), " must have one row per segment of ", seg_lens[0], " tokens");
  c.B = S;
  c.n = seg_lens[0];
  c.keep0 = keep[0];
  at::Tensor pos = positions;
  if (padded && pos.dim() == 3 && pos.size(0) == S) pos = pos.reshape({-1, 2});
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) == 2 && pos.scalar_type() == at::kFloat &&
                  (pos.size(0) == c.T || (padded && pos.size(0) == seg_lens[0])),
              who, ": positions must be float32 (T, 2) = (", c.T, ", 2)",
              padded ? " or the shared (n, 2) or per-row (B, n, 2)" : "", ", got ", positions.scalar_type(), " ",
              positions.sizes());
  TORCH_CHECK(eps > 0 && tau > 0 && n_iters >= 1 && tol >= 0 && recover_ratio >= 0 && recover_ratio < 1, who,
              ": need eps > 0, tau > 0, n_iters >= 1, tol >= 0 and 0 <= recover_ratio < 1; got eps=", eps, " tau=", tau,
              " n_iters=", n_iters, " tol=", tol, " recover_ratio=", recover_ratio);
  c.src = packed_rows(source);
  c.tgt = packed_rows(target);
  c.pos = pos.contiguous();
  return c;
}

// The CostArgs of (B, n, d) / (B, m, d) features and (B, ., 2) positions; s, t, p, q must stay alive
// (unit_last views or copies of the inputs) while the structure is used.
inline topv::CostArgs cost_args(const CostShape& c, const at::Tensor& s, const at::Tensor& t, const at::Tensor& p,
                                const at::Tensor& q, double alpha, double beta, double gamma, double sigma) {
  topv::CostArgs a{};
  a.source = s.data_ptr();
  a.target = t.data_ptr();
  a.dtype = feature_dtype(s);
  a.batch = c.B;
  a.n = c.n;
  a.m = c.m;
  a.d = c.d;
  a.source_batch_stride = s.stride(0);
  a.source_row_stride = s.stride(1);
  a.target_batch_stride = t.stride(0);
  a.target_row_stride = t.stride(1);
  a.src_pos = p.data_ptr<float>();
  a.tgt_pos = q.data_ptr<float>();
  a.src_pos_batch_stride = p.stride(0);
  a.src_pos_row_stride = p.stride(1);
  a.tgt_pos_batch_stride = q.stride(0);
  a.tgt_pos_row_stride = q.stride(1);
  a.cost = topv::CostParams{float(alpha), float(beta), float(gamma), float(sigma)};
  return a;
}

// The PruneArgs of a checked call (the caller sets sinkhorn.max_cluster where it applies).
inline topv::PruneArgs prune_args(const PruneCall& c, at::IntArrayRef seg_lens, at::IntArrayRef keep, bool padded,
                                  double alpha, double beta, double gamma, double sigma, double eps, double tau,
                                  int64_t n_iters, double tol, double recover_ratio, bool check_finite) {
  topv::PruneArgs a{};
  a.source = c.src.data_ptr();
  a.target = c.tgt.data_ptr();
  a.dtype = feature_dtype(c.src);
  a.total_rows = c.T;
  a.d = c.src.size(1);
  a.source_row_stride = c.src.stride(0);
  a.target_row_stride = c.tgt.stride(0);
  a.positions = c.pos.data_ptr<float>();
  a.position_rows = c.pos.size(0);
  a.seg_lens = seg_lens.data();
  a.keep = keep.data();
  a.num_segments = static_cast<int64_t>(seg_lens.size());
  a.padded = padded;
  a.cost = topv::CostParams{float(alpha), float(beta), float(gamma), float(sigma)};
  a.sinkhorn.eps = float(eps);
  a.sinkhorn.n_iters = int(n_iters);
  a.sinkhorn.tol = float(tol);
  a.tau = float(tau);
  a.recover_ratio = recover_ratio;
  a.check_finite = check_finite;
  return a;
}

}  // namespace topv_torch
