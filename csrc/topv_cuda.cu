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
#include "torch_checks.h"

namespace topv_cuda {
namespace {

constexpr const char* kWho = "topv (cuda)";

void check_cuda(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda(), kWho, ": ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == like.device(), kWho, ": ", name, " is on ", x.device(), " but source is on ",
              like.device());
}

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
  const topv_torch::CostShape c = topv_torch::check_cost_matrix(source, target, src_pos, tgt_pos, kWho);
  const c10::cuda::CUDAGuard guard(source.device());
  using topv_torch::unit_last;
  const at::Tensor s = unit_last(source), t = unit_last(target), p = unit_last(src_pos), q = unit_last(tgt_pos);
  const topv::CostArgs a = topv_torch::cost_args(c, s, t, p, q, alpha, beta, gamma, sigma);
  at::Tensor out = at::empty({c.B, c.n, c.m}, source.options().dtype(at::kFloat));
  const size_t ws_bytes = topv::cost_matrix_workspace_size(a);
  at::Tensor ws = workspace(ws_bytes, source);
  C10_CUDA_CHECK(topv::cost_matrix(a, out.data_ptr<float>(), ws.data_ptr(), ws_bytes,
                                   c10::cuda::getCurrentCUDAStream(source.get_device()).stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& cost, const std::optional<at::Tensor>& log_a,
                                                 const std::optional<at::Tensor>& log_b, double eps, int64_t n_iters,
                                                 double tol, double tau_a, double tau_b) {
  check_cuda(cost, "cost", cost);
  const auto [C, la, lb] = topv_torch::check_sinkhorn(cost, log_a, log_b, eps, n_iters, tol, tau_a, tau_b, kWho);
  const int64_t B = C.size(0), n = C.size(1), m = C.size(2);
  const c10::cuda::CUDAGuard guard(cost.device());
  topv::SinkhornArgs a{C.data_ptr<float>(), B, n, m, la.defined() ? la.data_ptr<float>() : nullptr,
                       lb.defined() ? lb.data_ptr<float>() : nullptr,
                       sinkhorn_params(eps, n_iters, tol), float(tau_a), float(tau_b)};
  at::Tensor f = at::empty({B, n}, C.options()), g = at::empty({B, m}, C.options());
  const size_t ws_bytes = topv::sinkhorn_workspace_size(a);
  at::Tensor ws = workspace(ws_bytes, C);
  C10_CUDA_CHECK(topv::sinkhorn(a, f.data_ptr<float>(), g.data_ptr<float>(), ws.data_ptr(), ws_bytes,
                                c10::cuda::getCurrentCUDAStream(cost.get_device()).stream()));
  return {f, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_cuda(const at::Tensor& source, const at::Tensor& target,
                                                          const at::Tensor& positions, at::IntArrayRef seg_lens,
                                                          at::IntArrayRef keep, bool padded, double alpha, double beta,
                                                          double gamma, double sigma, double eps, double tau,
                                                          int64_t n_iters, double tol, double recover_ratio,
                                                          bool check_finite, int64_t max_workspace) {
  check_cuda(source, "source", source);
  check_cuda(target, "target", source);
  check_cuda(positions, "positions", source);
  const topv_torch::PruneCall call = topv_torch::check_prune(source, target, positions, seg_lens, keep, padded, eps,
                                                             tau, n_iters, tol, recover_ratio, kWho);
  const c10::cuda::CUDAGuard guard(source.device());
  topv::PruneArgs a = topv_torch::prune_args(call, seg_lens, keep, padded, alpha, beta, gamma, sigma, eps, tau, n_iters,
                                             tol, recover_ratio, check_finite);
  a.sinkhorn = sinkhorn_params(eps, n_iters, tol);
  at::Tensor kept = at::empty({call.total_keep}, source.options().dtype(at::kLong));
  at::Tensor scores = at::empty({call.T}, source.options().dtype(at::kFloat));
  // Only written when check_finite (then zeroed on the device first); the caller reads it only then.
  at::Tensor nonfinite = at::empty({1}, source.options().dtype(at::kInt));
  // The cost buffer's cap: max_workspace, else TOPV_COST_BUFFER_CAP_BYTES (the tests use it to reach
  // the streamed path of large segments on small inputs), else a share of the free memory.
  TORCH_CHECK(max_workspace >= 0, kWho, ": max_workspace must be >= 0 (0: the default), got ", max_workspace);
  size_t cap = size_t(max_workspace);
  if (cap == 0) {
    const char* env = std::getenv("TOPV_COST_BUFFER_CAP_BYTES");
    cap = env ? std::max<size_t>(std::strtoull(env, nullptr, 10), 4) : topv::default_cost_buffer_cap();
  }
  const size_t ws_bytes = topv::prune_workspace_size(a, cap);
  TORCH_CHECK(ws_bytes > 0, kWho, ": prune arguments rejected (see the checks above)");
  at::Tensor ws = workspace(ws_bytes, source);
  C10_CUDA_CHECK(topv::prune(a, kept.data_ptr<int64_t>(), scores.data_ptr<float>(), nonfinite.data_ptr<int>(),
                             ws.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream(source.get_device()).stream(), cap));
  return call.shaped(kept, scores, nonfinite);
}

}  // namespace
}  // namespace topv_cuda

TORCH_LIBRARY_IMPL(topv, CUDA, m) {
  m.impl("cost_matrix_native", &topv_cuda::cost_matrix_cuda);
  m.impl("sinkhorn_native", &topv_cuda::sinkhorn_cuda);
  m.impl("prune_native", &topv_cuda::prune_cuda);
}
