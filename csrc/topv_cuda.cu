// Torch launchers of the topv native ops for CUDA tensors (backend="cuda"): argument checks, a
// device guard, the current stream, a workspace from the caching allocator, then the
// framework-free API of topv/topv.h (csrc/topv_api.cu), which launches the kernels and returns
// the first launch error. Nothing here synchronises with the host.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "topv/topv.h"

namespace topv_cuda {
namespace {

topv::DType feature_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return topv::DType::kFloat32;
    case at::kHalf: return topv::DType::kFloat16;
    case at::kBFloat16: return topv::DType::kBFloat16;
    default: TORCH_CHECK(false, "topv (cuda): ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return topv::DType::kFloat32;
}

void check_cuda(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda(), "topv (cuda): ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == like.device(), "topv (cuda): ", name, " is on ", x.device(), " but source is on ",
              like.device());
}

at::Tensor unit_last(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// TOPV_MAX_CLUSTER caps the cluster size of the on-chip Sinkhorn (0: the pass kernels); the tests
// use it to cover both paths on the same inputs.
topv::SinkhornParams sinkhorn_params(double eps, int64_t n_iters, double tol) {
  topv::SinkhornParams p{float(eps), int(n_iters), float(tol)};
  if (const char* env = std::getenv("TOPV_MAX_CLUSTER")) p.max_cluster = std::atoi(env);
  return p;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

at::Tensor cost_matrix_cuda(const at::Tensor& source, const at::Tensor& target, const at::Tensor& src_pos,
                            const at::Tensor& tgt_pos, double alpha, double beta, double gamma, double sigma) {
  check_cuda(source, "source", source);
  check_cuda(target, "target", source);
  check_cuda(src_pos, "src_pos", source);
  check_cuda(tgt_pos, "tgt_pos", source);
  const topv::DType dt = feature_dtype(source, "source");
  TORCH_CHECK(target.scalar_type() == source.scalar_type(), "topv (cuda): source and target dtypes differ: ",
              source.scalar_type(), " vs ", target.scalar_type());
  TORCH_CHECK(source.dim() == 3 && target.dim() == 3, "topv (cuda): source/target must be (B, n, d)/(B, m, d), got ",
              source.sizes(), " and ", target.sizes());
  const int64_t B = source.size(0), n = source.size(1), m = target.size(1), d = source.size(2);
  TORCH_CHECK(target.size(0) == B && target.size(2) == d && B >= 1 && n >= 1 && m >= 1 && d >= 1,
              "topv (cuda): target ", target.sizes(), " does not match source ", source.sizes());
  TORCH_CHECK(src_pos.sizes() == at::IntArrayRef({B, n, 2}) && src_pos.scalar_type() == at::kFloat,
              "topv (cuda): src_pos must be float32 (", B, ", ", n, ", 2), got ", src_pos.scalar_type(), " ",
              src_pos.sizes());
  TORCH_CHECK(tgt_pos.sizes() == at::IntArrayRef({B, m, 2}) && tgt_pos.scalar_type() == at::kFloat,
              "topv (cuda): tgt_pos must be float32 (", B, ", ", m, ", 2), got ", tgt_pos.scalar_type(), " ",
              tgt_pos.sizes());
  const c10::cuda::CUDAGuard guard(source.device());
  const at::Tensor s = unit_last(source), t = unit_last(target), p = unit_last(src_pos), q = unit_last(tgt_pos);
  topv::CostArgs a{};
  a.source = s.data_ptr();
  a.target = t.data_ptr();
  a.dtype = dt;
  a.batch = B;
  a.n = n;
  a.m = m;
  a.d = d;
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
  at::Tensor out = at::empty({B, n, m}, source.options().dtype(at::kFloat));
  const size_t ws_bytes = topv::cost_matrix_workspace_size(a);
  at::Tensor ws = workspace(ws_bytes, source);
  C10_CUDA_CHECK(topv::cost_matrix(a, out.data_ptr<float>(), ws.data_ptr(), ws_bytes,
                                   c10::cuda::getCurrentCUDAStream(source.get_device()).stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& cost, const std::optional<at::Tensor>& log_a,
                                                 const std::optional<at::Tensor>& log_b, double eps, int64_t n_iters,
                                                 double tol) {
  check_cuda(cost, "cost", cost);
  TORCH_CHECK(cost.scalar_type() == at::kFloat && cost.dim() == 3 && cost.numel() > 0,
              "topv (cuda): cost must be a non-empty float32 (B, n, m) tensor, got ", cost.scalar_type(), " ",
              cost.sizes());
  TORCH_CHECK(eps > 0 && n_iters >= 1 && tol >= 0, "topv (cuda): need eps > 0, n_iters >= 1, tol >= 0; got eps=", eps,
              " n_iters=", n_iters, " tol=", tol);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const c10::cuda::CUDAGuard guard(cost.device());
  const at::Tensor C = cost.contiguous();
  at::Tensor la, lb;
  if (log_a) {
    check_cuda(*log_a, "log_a", cost);
    TORCH_CHECK(log_a->sizes() == at::IntArrayRef({B, n}) && log_a->scalar_type() == at::kFloat,
                "topv (cuda): log_a must be float32 (", B, ", ", n, "), got ", log_a->sizes());
    la = log_a->contiguous();
  }
  if (log_b) {
    check_cuda(*log_b, "log_b", cost);
    TORCH_CHECK(log_b->sizes() == at::IntArrayRef({B, m}) && log_b->scalar_type() == at::kFloat,
                "topv (cuda): log_b must be float32 (", B, ", ", m, "), got ", log_b->sizes());
    lb = log_b->contiguous();
  }
  topv::SinkhornArgs a{C.data_ptr<float>(), B, n, m, la.defined() ? la.data_ptr<float>() : nullptr,
                       lb.defined() ? lb.data_ptr<float>() : nullptr,
                       sinkhorn_params(eps, n_iters, tol)};
  at::Tensor f = at::empty({B, n}, cost.options()), g = at::empty({B, m}, cost.options());
  const size_t ws_bytes = topv::sinkhorn_workspace_size(a);
  at::Tensor ws = workspace(ws_bytes, cost);
  C10_CUDA_CHECK(topv::sinkhorn(a, f.data_ptr<float>(), g.data_ptr<float>(), ws.data_ptr(), ws_bytes,
                                c10::cuda::getCurrentCUDAStream(cost.get_device()).stream()));
  return {f, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_cuda(const at::Tensor& source, const at::Tensor& target,
                                                          const at::Tensor& positions, at::IntArrayRef seg_lens,
                                                          at::IntArrayRef keep, bool padded, double alpha, double beta,
                                                          double gamma, double sigma, double eps, int64_t n_iters,
                                                          double tol, double recover_ratio, bool check_finite) {
  check_cuda(source, "source", source);
  check_cuda(target, "target", source);
  check_cuda(positions, "positions", source);
  const topv::DType dt = feature_dtype(source, "source");
  TORCH_CHECK(target.scalar_type() == source.scalar_type(), "topv (cuda): source and target dtypes differ: ",
              source.scalar_type(), " vs ", target.scalar_type());
  TORCH_CHECK(source.dim() == 2 && target.sizes() == source.sizes() && source.size(1) >= 1,
              "topv (cuda): source/target must be packed (T, d) of one shape, got ", source.sizes(), " and ",
              target.sizes());
  const int64_t T = source.size(0), S = static_cast<int64_t>(seg_lens.size());
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(keep.size()) == S, "topv (cuda): need one keep per segment, got ", S,
              " segments and ", keep.size(), " budgets");
  int64_t total = 0;
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(seg_lens[k] >= 1 && keep[k] >= 1 && keep[k] <= seg_lens[k], "topv (cuda): segment ", k,
                " has length ", seg_lens[k], " and keep ", keep[k], "; need 1 <= keep <= length");
    TORCH_CHECK(!padded || seg_lens[k] == seg_lens[0], "topv (cuda): padded segments must have equal lengths, got ",
                seg_lens);
    total += seg_lens[k];
  }
  TORCH_CHECK(total == T, "topv (cuda): seg_lens sum to ", total, " but source has T=", T, " rows");
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 2 && positions.scalar_type() == at::kFloat &&
                  (positions.size(0) == T || (padded && positions.size(0) == seg_lens[0])),
              "topv (cuda): positions must be float32 (T, 2) = (", T, ", 2)", padded ? " or the shared (n, 2)" : "",
              ", got ", positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(eps > 0 && n_iters >= 1 && tol >= 0 && recover_ratio >= 0 && recover_ratio < 1,
              "topv (cuda): need eps > 0, n_iters >= 1, tol >= 0 and 0 <= recover_ratio < 1; got eps=", eps,
              " n_iters=", n_iters, " tol=", tol, " recover_ratio=", recover_ratio);
  const c10::cuda::CUDAGuard guard(source.device());
  const at::Tensor s = unit_last(source), t = unit_last(target), pos = positions.contiguous();
  topv::PruneArgs a{};
  a.source = s.data_ptr();
  a.target = t.data_ptr();
  a.dtype = dt;
  a.total_rows = T;
  a.d = s.size(1);
  a.source_row_stride = s.stride(0);
  a.target_row_stride = t.stride(0);
  a.positions = pos.data_ptr<float>();
  a.position_rows = pos.size(0);
  a.seg_lens = seg_lens.data();
  a.keep = keep.data();
  a.num_segments = S;
  a.padded = padded;
  a.cost = topv::CostParams{float(alpha), float(beta), float(gamma), float(sigma)};
  a.sinkhorn = sinkhorn_params(eps, n_iters, tol);
  a.recover_ratio = recover_ratio;
  a.check_finite = check_finite;
  int64_t total_keep = 0;
  for (int64_t k = 0; k < S; ++k) total_keep += keep[k];
  at::Tensor kept = at::empty({total_keep}, source.options().dtype(at::kLong));
  at::Tensor scores = at::empty({T}, source.options().dtype(at::kFloat));
  // Only written when check_finite (then zeroed on the device first); the caller reads it only then.
  at::Tensor nonfinite = at::empty({1}, source.options().dtype(at::kInt));
  // TOPV_COST_BUFFER_CAP_BYTES lowers the cost-buffer cap (tests use it to reach the streamed
  // path of large segments on small inputs).
  size_t cap = topv::kDefaultCostBufferCap;
  if (const char* env = std::getenv("TOPV_COST_BUFFER_CAP_BYTES")) cap = std::max<size_t>(std::strtoull(env, nullptr, 10), 4);
  const size_t ws_bytes = topv::prune_workspace_size(a, cap);
  TORCH_CHECK(ws_bytes > 0, "topv (cuda): prune arguments rejected (see the checks above)");
  at::Tensor ws = workspace(ws_bytes, source);
  C10_CUDA_CHECK(topv::prune(a, kept.data_ptr<int64_t>(), scores.data_ptr<float>(), nonfinite.data_ptr<int>(),
                             ws.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream(source.get_device()).stream(), cap));
  return {kept, scores, nonfinite};
}

}  // namespace
}  // namespace topv_cuda

TORCH_LIBRARY_IMPL(topv, CUDA, m) {
  m.impl("cost_matrix_native", &topv_cuda::cost_matrix_cuda);
  m.impl("sinkhorn_native", &topv_cuda::sinkhorn_cuda);
  m.impl("prune_native", &topv_cuda::prune_cuda);
}
