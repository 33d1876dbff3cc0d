// Torch launchers of the topv native ops for CPU tensors (backend="cpp"): argument checks, a view of
// the tensors as the framework-free CPU API takes them (topv/topv_cpu.h, csrc/topv_cpu_api.cpp),
// and ATen's thread pool and BLAS as that API's runtime.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include "topv/topv_cpu.h"
#include "torch_checks.h"

namespace topv_cpp {
namespace {

constexpr const char* kWho = "topv (cpp)";

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), kWho, ": ", name, " must be a CPU tensor, got ", x.device());
}

// ATen's intra-op thread pool and its float32 BLAS (MKL in the PyTorch wheels).
void aten_parallel_for(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t), void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b0, int64_t b1) { body(ctx, b0, b1); });
}
int aten_threads() { return at::get_num_threads(); }
void aten_sgemm_nt(int64_t n, int64_t m, int64_t d, const float* s, int64_t lds, const float* t, int64_t ldt,
                   float* out) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::from_blob(const_cast<float*>(s), {n, d}, {lds, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<float*>(t), {m, d}, {ldt, 1}, opts);
  at::Tensor c = at::from_blob(out, {n, m}, opts);
  at::mm_out(c, a, b.t());
}
const topv::cpu::Runtime kAten{aten_parallel_for, aten_threads, aten_sgemm_nt};

at::Tensor cost_matrix_cpu(const at::Tensor& source, const at::Tensor& target, const at::Tensor& src_pos,
                           const at::Tensor& tgt_pos, double alpha, double beta, double gamma, double sigma) {
  for (auto [x, name] : {std::pair{&source, "source"}, {&target, "target"}, {&src_pos, "src_pos"}, {&tgt_pos, "tgt_pos"}})
    check_cpu(*x, name);
  const topv_torch::CostShape c = topv_torch::check_cost_matrix(source, target, src_pos, tgt_pos, kWho);
  using topv_torch::unit_last;
  const at::Tensor s = unit_last(source), t = unit_last(target), p = unit_last(src_pos), q = unit_last(tgt_pos);
  const topv::CostArgs a = topv_torch::cost_args(c, s, t, p, q, alpha, beta, gamma, sigma);
  at::Tensor out = at::empty({c.B, c.n, c.m}, source.options().dtype(at::kFloat));
  TORCH_CHECK(topv::cpu::cost_matrix(a, out.data_ptr<float>(), nullptr, kAten), kWho, ": cost_matrix arguments rejected");
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& cost, const std::optional<at::Tensor>& log_a,
                                                const std::optional<at::Tensor>& log_b, double eps, int64_t n_iters,
                                                double tol, double tau_a, double tau_b) {
  check_cpu(cost, "cost");
  const auto [C, la, lb] = topv_torch::check_sinkhorn(cost, log_a, log_b, eps, n_iters, tol, tau_a, tau_b, kWho);
  const int64_t B = C.size(0), n = C.size(1), m = C.size(2);
  topv::SinkhornArgs a{C.data_ptr<float>(), B, n, m, la.defined() ? la.data_ptr<float>() : nullptr,
                       lb.defined() ? lb.data_ptr<float>() : nullptr,
                       topv::SinkhornParams{float(eps), int(n_iters), float(tol)}, float(tau_a), float(tau_b)};
  at::Tensor f = at::empty({B, n}, C.options()), g = at::empty({B, m}, C.options());
  TORCH_CHECK(topv::cpu::sinkhorn(a, f.data_ptr<float>(), g.data_ptr<float>(), kAten), kWho,
              ": sinkhorn arguments rejected");
  return {f, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_cpu(const at::Tensor& source, const at::Tensor& target,
                                                         const at::Tensor& positions, at::IntArrayRef seg_lens,
                                                         at::IntArrayRef keep, bool padded, double alpha, double beta,
                                                         double gamma, double sigma, double eps, double tau,
                                                         int64_t n_iters, double tol, double recover_ratio,
                                                         bool check_finite, int64_t /*max_workspace: each segment's
                                                                                      cost is held whole here*/) {
  check_cpu(source, "source");
  check_cpu(target, "target");
  check_cpu(positions, "positions");
  const topv_torch::PruneCall call = topv_torch::check_prune(source, target, positions, seg_lens, keep, padded, eps,
                                                             tau, n_iters, tol, recover_ratio, kWho);
  const topv::PruneArgs a = topv_torch::prune_args(call, seg_lens, keep, padded, alpha, beta, gamma, sigma, eps, tau,
                                                   n_iters, tol, recover_ratio, check_finite);
  at::Tensor kept = at::empty({call.total_keep}, source.options().dtype(at::kLong));
  at::Tensor scores = at::empty({call.T}, source.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::zeros({1}, source.options().dtype(at::kInt));
  TORCH_CHECK(topv::cpu::prune(a, kept.data_ptr<int64_t>(), scores.data_ptr<float>(), nonfinite.data_ptr<int>(), kAten),
              kWho, ": prune arguments rejected");
  return call.shaped(kept, scores, nonfinite);
}

}  // namespace
}  // namespace topv_cpp

TORCH_LIBRARY_IMPL(topv, CPU, m) {
  m.impl("cost_matrix_native", &topv_cpp::cost_matrix_cpu);
  m.impl("sinkhorn_native", &topv_cpp::sinkhorn_cpu);
  m.impl("prune_native", &topv_cpp::prune_cpu);
}

// `import topv._C` only loads this library (its static initialisers register the kernels above);
// the module itself is empty. Built with the limited API (setup.py sets Py_LIMITED_API).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
