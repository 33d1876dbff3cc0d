// C++ CPU kernels of the topv native ops (backend="cpp"), registered for the CPU key.
//
// The math is docs/algorithm.md. The cost GEMM goes to ATen's BLAS (MKL / oneDNN on x86): it is
// the one part a hand loop cannot match. Everything after the GEMM (epilogue, Sinkhorn passes,
// scores, selection) is plain loops that the compiler vectorises (a branch-free exp, `omp simd`
// reductions) and at::parallel_for spreads over rows, columns or segments.
//
// Sinkhorn follows the fast-path contract of the spec: with tol > 0 the row pass that starts
// iteration t+1 also measures the plan violation of iteration t, Σ_i a_i |exp((f_i - f'_i)/ε) - 1|;
// if it is below tol the segment keeps (f_t, g_t) and its scores come from that row pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

// The hot loops below compare floats (clamps, maxima); GCC if-converts them into vector selects
// only when it may assume that comparisons do not trap, so those few leaf functions (never on
// the stack when an error is thrown) get that option. Clones for AVX-512 and AVX2 are chosen at
// load time, so the build stays portable to any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TOPV_VEC_CLONES __attribute__((optimize("no-trapping-math"), target_clones("avx512f", "avx2", "default")))
#elif defined(__GNUC__) && !defined(__clang__)
#define TOPV_VEC_CLONES __attribute__((optimize("no-trapping-math")))
#else
#define TOPV_VEC_CLONES
#endif

namespace topv_cpu {
namespace {

constexpr float kCentre = 0.5f;
constexpr float kInvMaxCentreDist = 1.41421356237309515f;  // 1 / sqrt(0.5)

// exp(x) for x <= ~88 without libm calls, so loops around it vectorise. Cody-Waite reduction
// x = k ln2 + r, |r| <= ln2/2, then a degree-6 Taylor polynomial: relative error ~2e-7, about
// float32 rounding. Below -87 it returns exp(-87) ~ 1.6e-38 (callers only add such terms to sums
// that are >= 1). NaN stays NaN.
__attribute__((always_inline)) inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x log2(e) to the nearest integer by adding 1.5 * 2^23 (no floor call: keeps the loop
  // vectorisable on plain SSE2); the integer then sits in the low mantissa bits of t.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float k = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log-sum-exp of (add[j] - c[j]) * inv_eps over j < m: returns the max and the shifted sum.
TOPV_VEC_CLONES void row_lse(const float* c, const float* add, int64_t m, float inv_eps, float& mx_out, float& sum_out) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) {
    const float v = (add[j] - c[j]) * inv_eps;  // no std::max: a header function would not inline here
    mx = v > mx ? v : mx;
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += vexp((add[j] - c[j]) * inv_eps - mx);
  mx_out = mx;
  sum_out = s;
}

// Column-pass inner loops over one row of C (kept out of the parallel lambdas so GCC
// vectorises them).
TOPV_VEC_CLONES void col_max_row(float* mx, const float* c, float fi, float inv_eps, int64_t w) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    const float cur = mx[j], v = (fi - c[j]) * inv_eps;
    mx[j] = v > cur ? v : cur;
  }
}

TOPV_VEC_CLONES void col_sum_row(float* s, const float* mx, const float* c, float fi, float inv_eps, int64_t w) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) s[j] += vexp((fi - c[j]) * inv_eps - mx[j]);
}

// One row of the cost epilogue: row holds s_i . t_j on entry and C_ij on exit.
TOPV_VEC_CLONES void epilogue_row(float* row, const float* t_inv, const float* qr, const float* qc, int64_t m, float si, float pr,
                  float pc, float ha, float beta, float neg_inv_2s2, float centre) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const float cosv = row[j] * si * t_inv[j];
    const float a = pr - qr[j], b = pc - qc[j];
    row[j] = ha * (1.0f - cosv) + beta * (1.0f - vexp((a * a + b * b) * neg_inv_2s2)) + centre;
  }
}

// One Sinkhorn problem: C (n, m) row-major fp32, optional log marginals (else uniform).
struct Problem {
  const float* C;
  int64_t n, m;
  const float* log_a;  // (n,) or nullptr
  const float* log_b;  // (m,) or nullptr
};

struct Result {
  float* f;      // (n,)
  float* g;      // (m,)
  float* score;  // (n,) or nullptr
};

// f'_i = eps (log a_i - LSE_j((g_j - C_ij)/eps)); also ratio_i = exp((f_i - f'_i)/eps) (the row
// mass of the plan (f, g) over a_i). Rows in parallel.
void row_pass(const Problem& P, const float* f, const float* g, float eps, float* f_next, float* ratio) {
  const float inv_eps = 1.0f / eps;
  const float la_uniform = -std::log(static_cast<float>(P.n));
  at::parallel_for(0, P.n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float mx, s;
      row_lse(P.C + i * P.m, g, P.m, inv_eps, mx, s);
      const float lse = mx + std::log(s);
      const float la = P.log_a ? P.log_a[i] : la_uniform;
      f_next[i] = eps * (la - lse);
      if (ratio) ratio[i] = std::exp(f[i] * inv_eps - la + lse);
    }
  });
}

// g_j = eps (log b_j - LSE_i((f_i - C_ij)/eps)). Column blocks in parallel; within a block the
// loops run along rows of C so the inner loop over j is contiguous and vectorises.
void col_pass(const Problem& P, const float* f, float eps, float* g) {
  const float inv_eps = 1.0f / eps;
  const float lb_uniform = -std::log(static_cast<float>(P.m));
  at::parallel_for(0, P.m, 256, [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    std::vector<float> mx(w, -std::numeric_limits<float>::infinity()), s(w, 0.0f);
    for (int64_t i = 0; i < P.n; ++i) {
      col_max_row(mx.data(), P.C + i * P.m + j0, f[i], inv_eps, w);
    }
    for (int64_t i = 0; i < P.n; ++i) {
      col_sum_row(s.data(), mx.data(), P.C + i * P.m + j0, f[i], inv_eps, w);
    }
    for (int64_t j = 0; j < w; ++j) {
      const float lb = P.log_b ? P.log_b[j0 + j] : lb_uniform;
      g[j0 + j] = eps * (lb - (mx[j] + std::log(s[j])));
    }
  });
}

void sinkhorn(const Problem& P, float eps, int64_t n_iters, float tol, const Result& R) {
  std::fill(R.f, R.f + P.n, 0.0f);
  std::fill(R.g, R.g + P.m, 0.0f);
  std::vector<float> f_next(P.n), ratio(P.n);
  bool have_next = false;  // f_next already holds the f update from the current g
  for (int64_t t = 0; t < n_iters; ++t) {
    if (!have_next) row_pass(P, R.f, R.g, eps, f_next.data(), nullptr);
    std::copy(f_next.begin(), f_next.end(), R.f);
    col_pass(P, R.f, eps, R.g);
    have_next = false;
    if (tol > 0) {
      row_pass(P, R.f, R.g, eps, f_next.data(), ratio.data());
      have_next = true;
      double viol = 0.0;
      for (int64_t i = 0; i < P.n; ++i) {
        const float a = P.log_a ? std::exp(P.log_a[i]) : 1.0f / static_cast<float>(P.n);
        viol += static_cast<double>(a) * std::fabs(ratio[i] - 1.0f);
      }
      if (viol < tol) break;
    }
  }
  if (R.score) {
    if (!have_next) row_pass(P, R.f, R.g, eps, f_next.data(), ratio.data());
    // score_i = n a_i exp((f_i - f'_i)/eps)
    for (int64_t i = 0; i < P.n; ++i) {
      const float a = P.log_a ? std::exp(P.log_a[i]) : 1.0f / static_cast<float>(P.n);
      R.score[i] = static_cast<float>(P.n) * a * ratio[i];
    }
  }
}

// Inverse L2 norms of the rows of x (rows, d) fp32 (0 for a zero row); returns true when an
// element is not finite (x - x is NaN exactly for Inf and NaN, and the loop stays vectorisable).
bool inv_norms(const float* x, int64_t rows, int64_t d, int64_t ld, float* out) {
  std::vector<char> bad(rows, 0);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = x + r * ld;
      float ss = 0.0f, z = 0.0f;
#pragma omp simd reduction(+ : ss, z)
      for (int64_t k = 0; k < d; ++k) {
        ss += p[k] * p[k];
        z += p[k] - p[k];
      }
      const float nrm = std::sqrt(ss);
      out[r] = nrm > 0.0f ? 1.0f / nrm : 0.0f;
      bad[r] = !(z == 0.0f);
    }
  });
  return std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
}

// Cost epilogue on one row block: c holds s_i . t_j on entry and C_ij on exit.
void cost_epilogue(float* c, int64_t n, int64_t m, const float* s_inv, const float* t_inv, const float* p,
                   int64_t p_ld, const float* q, int64_t q_ld, float alpha, float beta, float gamma, float sigma) {
  const float neg_inv_2s2 = -1.0f / (2.0f * sigma * sigma);
  // q as two contiguous coordinate arrays so the inner loop is unit-stride.
  std::vector<float> qr(m), qc(m);
  for (int64_t j = 0; j < m; ++j) {
    qr[j] = q[j * q_ld];
    qc[j] = q[j * q_ld + 1];
  }
  at::parallel_for(0, n, 32, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* row = c + i * m;
      const float pr = p[i * p_ld], pc = p[i * p_ld + 1];
      const float dr = pr - kCentre, dc = pc - kCentre;
      const float centre = gamma * std::sqrt(dr * dr + dc * dc) * kInvMaxCentreDist;
      epilogue_row(row, t_inv, qr.data(), qc.data(), m, s_inv[i], pr, pc, 0.5f * alpha, beta, neg_inv_2s2, centre);
    }
  });
}

// C (n, m) = cost of s (n, d) against t (m, d), both fp32 with unit stride on d.
bool cost_block(const at::Tensor& s, const at::Tensor& t, const float* p, int64_t p_ld, const float* q, int64_t q_ld,
                float alpha, float beta, float gamma, float sigma, float* out) {
  const int64_t n = s.size(0), m = t.size(0), d = s.size(1);
  std::vector<float> s_inv(n), t_inv(m);
  bool bad = inv_norms(s.data_ptr<float>(), n, d, s.stride(0), s_inv.data());
  bad |= inv_norms(t.data_ptr<float>(), m, d, t.stride(0), t_inv.data());
  at::Tensor c = at::from_blob(out, {n, m}, s.options());
  at::mm_out(c, s, t.t());
  cost_epilogue(out, n, m, s_inv.data(), t_inv.data(), p, p_ld, q, q_ld, alpha, beta, gamma, sigma);
  return bad;
}

// Kept indices of one segment (see the spec): top k_top by (score desc, NaN lowest, index asc),
// then uniform recovery from the rest, written ascending into out (offset by base).
void select(const float* score, int64_t n, int64_t keep, double recover_ratio, int64_t base, int64_t* out) {
  const int64_t k_rec = static_cast<int64_t>(std::floor(recover_ratio * static_cast<double>(keep)));
  const int64_t k_top = keep - k_rec;
  const float ninf = -std::numeric_limits<float>::infinity();
  auto key = [&](int64_t i) { return std::isnan(score[i]) ? ninf : score[i]; };
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  // A total order (ties broken by index), so the first k_top after nth_element are exactly the top set.
  std::nth_element(idx.begin(), idx.begin() + (k_top - 1), idx.end(), [&](int64_t a, int64_t b) {
    const float ka = key(a), kb = key(b);
    return ka > kb || (ka == kb && a < b);
  });
  std::vector<char> kept(n, 0);
  for (int64_t r = 0; r < k_top; ++r) kept[idx[r]] = 1;
  if (k_rec > 0) {
    const int64_t L = n - k_top;
    int64_t rank = 0, j = 0;
    int64_t want = (1 * L) / (2 * k_rec);  // rest position of recovery j = 0
    for (int64_t i = 0; i < n && j < k_rec; ++i) {
      if (kept[i] == 1) continue;
      if (rank == want) {
        kept[i] = 2;
        ++j;
        want = ((2 * j + 1) * L) / (2 * k_rec);
      }
      ++rank;
    }
  }
  int64_t o = 0;
  for (int64_t i = 0; i < n; ++i)
    if (kept[i]) out[o++] = base + i;
}

// ------------------------------------------------------------------------------------------
// Torch entry points
// ------------------------------------------------------------------------------------------

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "topv (cpp): ", name, " must be a CPU tensor, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "topv (cpp): ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

at::Tensor rows_f32(const at::Tensor& x) {
  at::Tensor y = x.to(at::kFloat);
  return y.stride(-1) == 1 ? y : y.contiguous();
}

at::Tensor cost_matrix_cpu(const at::Tensor& source, const at::Tensor& target, const at::Tensor& src_pos,
                           const at::Tensor& tgt_pos, double alpha, double beta, double gamma, double sigma) {
  check_features(source, "source");
  check_features(target, "target");
  TORCH_CHECK(source.dim() == 3 && target.dim() == 3, "topv (cpp): source/target must be (B, n, d)/(B, m, d), got ",
              source.sizes(), " and ", target.sizes());
  const int64_t B = source.size(0), n = source.size(1), m = target.size(1), d = source.size(2);
  TORCH_CHECK(target.size(0) == B && target.size(2) == d, "topv (cpp): target ", target.sizes(),
              " does not match source ", source.sizes());
  TORCH_CHECK(src_pos.sizes() == at::IntArrayRef({B, n, 2}) && src_pos.scalar_type() == at::kFloat,
              "topv (cpp): src_pos must be float32 (B, n, 2) = (", B, ", ", n, ", 2), got ", src_pos.sizes(), " ",
              src_pos.scalar_type());
  TORCH_CHECK(tgt_pos.sizes() == at::IntArrayRef({B, m, 2}) && tgt_pos.scalar_type() == at::kFloat,
              "topv (cpp): tgt_pos must be float32 (B, m, 2) = (", B, ", ", m, ", 2), got ", tgt_pos.sizes(), " ",
              tgt_pos.scalar_type());
  const at::Tensor s = rows_f32(source), t = rows_f32(target);
  const at::Tensor p = src_pos.contiguous(), q = tgt_pos.contiguous();
  at::Tensor out = at::empty({B, n, m}, source.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b)
    cost_block(s[b], t[b], p.data_ptr<float>() + b * n * 2, 2, q.data_ptr<float>() + b * m * 2, 2, alpha, beta,
               gamma, sigma, out.data_ptr<float>() + b * n * m);
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& cost, const std::optional<at::Tensor>& log_a,
                                                const std::optional<at::Tensor>& log_b, double eps, int64_t n_iters,
                                                double tol) {
  TORCH_CHECK(cost.device().is_cpu() && cost.scalar_type() == at::kFloat && cost.dim() == 3,
              "topv (cpp): cost must be a float32 (B, n, m) CPU tensor, got ", cost.scalar_type(), " ", cost.sizes(),
              " on ", cost.device());
  TORCH_CHECK(eps > 0 && n_iters >= 1 && tol >= 0, "topv (cpp): need eps > 0, n_iters >= 1, tol >= 0; got eps=", eps,
              " n_iters=", n_iters, " tol=", tol);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const at::Tensor C = cost.contiguous();
  at::Tensor la, lb;
  if (log_a) {
    TORCH_CHECK(log_a->sizes() == at::IntArrayRef({B, n}) && log_a->scalar_type() == at::kFloat,
                "topv (cpp): log_a must be float32 (", B, ", ", n, "), got ", log_a->sizes());
    la = log_a->contiguous();
  }
  if (log_b) {
    TORCH_CHECK(log_b->sizes() == at::IntArrayRef({B, m}) && log_b->scalar_type() == at::kFloat,
                "topv (cpp): log_b must be float32 (", B, ", ", m, "), got ", log_b->sizes());
    lb = log_b->contiguous();
  }
  at::Tensor f = at::empty({B, n}, cost.options()), g = at::empty({B, m}, cost.options());
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      Problem P{C.data_ptr<float>() + b * n * m, n, m, la.defined() ? la.data_ptr<float>() + b * n : nullptr,
                lb.defined() ? lb.data_ptr<float>() + b * m : nullptr};
      sinkhorn(P, eps, n_iters, tol, Result{f.data_ptr<float>() + b * n, g.data_ptr<float>() + b * m, nullptr});
    }
  });
  return {f, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_cpu(const at::Tensor& source, const at::Tensor& target,
                                                         const at::Tensor& positions, at::IntArrayRef seg_lens,
                                                         at::IntArrayRef keep, bool padded, double alpha, double beta,
                                                         double gamma, double sigma, double eps, int64_t n_iters,
                                                         double tol, double recover_ratio, bool check_finite) {
  check_features(source, "source");
  check_features(target, "target");
  TORCH_CHECK(source.dim() == 2 && target.sizes() == source.sizes(), "topv (cpp): source/target must be packed (T, d) "
              "of one shape, got ", source.sizes(), " and ", target.sizes());
  TORCH_CHECK(target.scalar_type() == source.scalar_type(), "topv (cpp): source and target dtypes differ: ",
              source.scalar_type(), " vs ", target.scalar_type());
  const int64_t T = source.size(0);
  const int64_t S = static_cast<int64_t>(seg_lens.size());
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(keep.size()) == S, "topv (cpp): need one keep per segment, got ", S,
              " segments and ", keep.size(), " budgets");
  int64_t total = 0, total_keep = 0;
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(seg_lens[k] >= 1 && keep[k] >= 1 && keep[k] <= seg_lens[k], "topv (cpp): segment ", k, " has length ",
                seg_lens[k], " and keep ", keep[k], "; need 1 <= keep <= length");
    TORCH_CHECK(!padded || seg_lens[k] == seg_lens[0], "topv (cpp): padded segments must have equal lengths");
    total += seg_lens[k];
    total_keep += keep[k];
  }
  TORCH_CHECK(total == T, "topv (cpp): seg_lens sum to ", total, " but source has T=", T, " rows");
  const bool shared_pos = padded && positions.size(0) == seg_lens[0] && S > 1;
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 2 && positions.scalar_type() == at::kFloat &&
                  (positions.size(0) == T || shared_pos || (padded && positions.size(0) == seg_lens[0])),
              "topv (cpp): positions must be float32 (T, 2) = (", T, ", 2)", padded ? " or the shared (n, 2)" : "",
              ", got ", positions.scalar_type(), " ", positions.sizes());
  TORCH_CHECK(eps > 0 && n_iters >= 1 && tol >= 0 && recover_ratio >= 0 && recover_ratio < 1,
              "topv (cpp): need eps > 0, n_iters >= 1, tol >= 0, 0 <= recover_ratio < 1");

  const at::Tensor s = rows_f32(source), t = rows_f32(target), pos = positions.contiguous();
  at::Tensor kept = at::empty({total_keep}, source.options().dtype(at::kLong));
  at::Tensor scores = at::empty({T}, source.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::zeros({1}, source.options().dtype(at::kInt));
  std::vector<int64_t> starts(S), out_starts(S);
  for (int64_t k = 0, a = 0, o = 0; k < S; a += seg_lens[k], o += keep[k], ++k) {
    starts[k] = a;
    out_starts[k] = o;
  }
  std::vector<char> bad(S, 0);
  const float* P = pos.data_ptr<float>();
  // Many segments: one per thread. Few: each segment's loops use the threads instead (a nested
  // at::parallel_for runs inline).
  at::parallel_for(0, S, S >= at::get_num_threads() ? 1 : S, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = seg_lens[k], a = starts[k];
      std::vector<float> C(n * n), f(n), g(n);
      const float* p = P + (positions.size(0) == T ? a * 2 : 0);
      bad[k] = cost_block(s.narrow(0, a, n), t.narrow(0, a, n), p, 2, p, 2, alpha, beta, gamma, sigma, C.data());
      sinkhorn(Problem{C.data(), n, n, nullptr, nullptr}, eps, n_iters, tol,
               Result{f.data(), g.data(), scores.data_ptr<float>() + a});
      select(scores.data_ptr<float>() + a, n, keep[k], recover_ratio, padded ? 0 : a,
             kept.data_ptr<int64_t>() + out_starts[k]);
    }
  });
  if (check_finite) {
    bool any = std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
    const int64_t np = pos.numel();
    for (int64_t i = 0; i < np && !any; ++i) any = !std::isfinite(P[i]);
    nonfinite.fill_(any ? 1 : 0);
  }
  return {kept, scores, nonfinite};
}

}  // namespace
}  // namespace topv_cpu

TORCH_LIBRARY_IMPL(topv, CPU, m) {
  m.impl("cost_matrix_native", &topv_cpu::cost_matrix_cpu);
  m.impl("sinkhorn_native", &topv_cpu::sinkhorn_cpu);
  m.impl("prune_native", &topv_cpu::prune_cpu);
}

// `import topv._C` only loads this library (its static initialisers register the kernels above);
// the module itself is empty. Built with the limited API (setup.py sets Py_LIMITED_API).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
