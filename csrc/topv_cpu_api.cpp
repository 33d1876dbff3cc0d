// Framework-free C++ CPU kernels of TopV (topv/topv_cpu.h): no torch, no CUDA. The torch extension
// (csrc/topv_cpu.cpp, backend="cpp") and the CMake library (topv::cpu) both build this file.
//
// The math is docs/algorithm.md. The cost GEMM: bfloat16 inputs on a CPU with AVX512-BF16 and no
// AMX (AMD Zen 4+, Cooper Lake; see has_bf16_gemm) use our own kernel below, which feeds the bf16
// values straight into vdpbf16ps (exact products, float32 sums, float32 output) and applies the
// cost epilogue to each block of rows while it is in L1; no library offers a bf16 x bf16 -> fp32
// GEMM on such CPUs (ATen's bf16 mm rounds the output to bf16, its brgemm ukernel needs AMX), and
// upcasting to fp32 costs twice the FLOP time. Every other input is converted to float32 and goes
// to the Runtime's sgemm_nt (ATen's BLAS under torch: MKL runs near the fp32 FMA peak, so an fp32
// input cannot get much faster than the reference's own GEMM; a built-in blocked GEMM otherwise).
// Everything after the GEMM (Sinkhorn passes, scores, selection) is plain loops that the compiler
// vectorises (a branch-free exp, `omp simd` reductions) and the Runtime's parallel_for spreads
// over rows, columns or segments; Sinkhorn turns all but its first pass into matrix-vector
// products (see "The fast form" below).
//
// Sinkhorn follows the fast-path contract of the spec: the row pass that starts iteration t+1 gives
// L_i = LSE_j((g_j - C_ij)/ε) for the plan (f_t, g_t), whose row mass is exp(f_i/ε + L_i): the
// scores n · mass_i and, with tol > 0, the relaxed row violation Σ_i |mass_i - a_i exp(-f_i/τ_a)|;
// below tol the segment keeps (f_t, g_t) and its scores come from that row pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "topv/topv_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define TOPV_BF16_GEMM 1
#endif

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

namespace topv {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The runtime: threads and the float32 GEMM (topv_cpu.h's Runtime, with these defaults)
// ---------------------------------------------------------------------------------------------

void omp_parallel_for(int64_t begin, int64_t end, int64_t grain, void (*body)(void*, int64_t, int64_t), void* ctx) {
  if (begin >= end) return;
#ifdef _OPENMP
  const int64_t n = end - begin, g = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(omp_get_max_threads(), (n + g - 1) / g);
  if (chunks > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(chunks))
    {
      const int64_t team = omp_get_num_threads(), per = (n + team - 1) / team;
      const int64_t b0 = begin + omp_get_thread_num() * per, b1 = std::min(end, b0 + per);
      if (b0 < b1) body(ctx, b0, b1);
    }
    return;
  }
#endif
  body(ctx, begin, end);
}

int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// f(b0, b1) over [begin, end) through the runtime's parallel_for.
template <class F>
void pfor(const Runtime& rt, int64_t begin, int64_t end, int64_t grain, const F& f) {
  auto body = [](void* ctx, int64_t b0, int64_t b1) { (*static_cast<const F*>(ctx))(b0, b1); };
  (rt.parallel_for ? rt.parallel_for : omp_parallel_for)(begin, end, grain, body,
                                                          const_cast<void*>(static_cast<const void*>(&f)));
}

int threads_of(const Runtime& rt) { return rt.num_threads ? rt.num_threads() : omp_threads(); }

// out (n, m) = s . t^T, 4 x 4 blocks of dot products with the k loop vectorised: the default when
// the caller brings no BLAS (several times slower than MKL on fp32; the bf16 kernel below does not
// use it).
void builtin_sgemm_nt(int64_t n, int64_t m, int64_t d, const float* s, int64_t lds, const float* t, int64_t ldt,
                      float* out) {
  auto rows = [&](int64_t i0, int64_t i1) {
    for (int64_t ib = i0; ib < i1; ib += 4)
      for (int64_t jb = 0; jb < m; jb += 4) {
        const int64_t ni = std::min<int64_t>(4, i1 - ib), nj = std::min<int64_t>(4, m - jb);
        float acc[16] = {};
        for (int64_t a = 0; a < ni; ++a)
          for (int64_t b = 0; b < nj; ++b) {
            const float* x = s + (ib + a) * lds;
            const float* y = t + (jb + b) * ldt;
            float v = 0.0f;
#pragma omp simd reduction(+ : v)
            for (int64_t k = 0; k < d; ++k) v += x[k] * y[k];
            acc[a * 4 + b] = v;
          }
        for (int64_t a = 0; a < ni; ++a)
          for (int64_t b = 0; b < nj; ++b) out[(ib + a) * m + jb + b] = acc[a * 4 + b];
      }
  };
  pfor(Runtime{}, 0, (n + 3) / 4, 4, [&](int64_t b0, int64_t b1) { rows(b0 * 4, std::min(n, b1 * 4)); });
}

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

// C_ij from its cosine, the position differences (dr, dc) and the row's centre term.
__attribute__((always_inline)) inline float cost_formula(float cosv, float dr, float dc, float ha, float beta,
                                                         float neg_inv_2s2, float centre) {
  return ha * (1.0f - cosv) + beta * (1.0f - vexp((dr * dr + dc * dc) * neg_inv_2s2)) + centre;
}

// One row of the cost epilogue: row holds s_i . t_j on entry and C_ij on exit.
TOPV_VEC_CLONES void epilogue_row(float* row, const float* t_inv, const float* qr, const float* qc, int64_t m, float si, float pr,
                  float pc, float ha, float beta, float neg_inv_2s2, float centre) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j)
    row[j] = cost_formula(row[j] * si * t_inv[j], pr - qr[j], pc - qc[j], ha, beta, neg_inv_2s2, centre);
}

// The marginals' relaxation of one solve (docs/algorithm.md): each potential update is scaled by
// kappa = τ/(τ + ε) (1 for an exact marginal), and the relaxed row target a_i exp(-f_i/τ_a) is
// exp(log a_i - rho_a f_i/ε) with rho_a = ε/τ_a (0 for an exact marginal).
struct Relax {
  float kappa_a = 1.0f, kappa_b = 1.0f, rho_a = 0.0f;
  Relax(double eps, double tau_a, double tau_b)
      : kappa_a(kappa(tau_a, eps)), kappa_b(kappa(tau_b, eps)), rho_a(rho(tau_a, eps)) {}
};

// One Sinkhorn problem: C (n, m) row-major fp32, optional log marginals (else uniform).
struct Problem {
  const float* C;
  int64_t n, m;
  const float* log_a;  // (n,) or nullptr
  const float* log_b;  // (m,) or nullptr
  Relax relax;
  const Runtime* rt;
};

struct Result {
  float* f;      // (n,)
  float* g;      // (m,)
  float* score;  // (n,) or nullptr
};

// Scratch buffers (the cost of a prune segment, Sinkhorn's E, the packed GEMM operand) that each
// thread keeps between calls: fresh pages from the OS fault in at ~1 µs each, which measured ~0.35
// ms of a 2.1 ms prune at n = 576 when other work had freed memory in between. Buffers up to
// kKeptScratchBytes stay with the thread; larger ones are allocated per call.
enum class Scratch { kCost, kPlan, kPacked, kCount };
constexpr size_t kKeptScratchBytes = size_t{32} << 20;

class ScratchBuffer {
 public:
  // 64-byte aligned room for `count` elements of T, valid until the next get() of this slot on this
  // thread, or until this object goes for a per-call buffer.
  template <typename T>
  T* get(Scratch slot, size_t count) {
    const size_t bytes = count * sizeof(T) + 64;  // room to align
    Slot& buf = bytes <= kKeptScratchBytes ? kept()[static_cast<int>(slot)] : own_;
    if (buf.size < bytes) {
      buf.data.reset(new unsigned char[bytes]);
      buf.size = bytes;
    }
    const uintptr_t addr = reinterpret_cast<uintptr_t>(buf.data.get());
    return reinterpret_cast<T*>(buf.data.get() + (64 - addr % 64) % 64);
  }

 private:
  struct Slot {
    std::unique_ptr<unsigned char[]> data;
    size_t size = 0;
  };
  static Slot* kept() {
    thread_local Slot slots[static_cast<int>(Scratch::kCount)];
    return slots;
  }
  Slot own_;
};

// The exact passes: log-sum-exps over C, max first. They run for every pass where the fast form
// below could lose precision.

// f'_i = eps (log a_i - LSE_j((g_j - C_ij)/eps)) for one row; returns the LSE.
float row_lse_exact(const Problem& P, int64_t i, const float* g, float inv_eps) {
  float mx, s;
  row_lse(P.C + i * P.m, g, P.m, inv_eps, mx, s);
  return mx + std::log(s);
}

// LSE_i((f_i - C_ij)/eps) for the columns [j0, j0 + w); loops run along rows of C so the inner
// loop over j is contiguous and vectorises.
void col_lse_exact(const Problem& P, const float* f, float inv_eps, int64_t j0, int64_t w, float* lse) {
  std::vector<float> mx(w, -std::numeric_limits<float>::infinity()), s(w, 0.0f);
  for (int64_t i = 0; i < P.n; ++i) col_max_row(mx.data(), P.C + i * P.m + j0, f[i], inv_eps, w);
  for (int64_t i = 0; i < P.n; ++i) col_sum_row(s.data(), mx.data(), P.C + i * P.m + j0, f[i], inv_eps, w);
  for (int64_t j = 0; j < w; ++j) lse[j] = mx[j] + std::log(s[j]);
}

// The fast form. With K = -C/eps, the first row pass (g = 0) takes the row maxima M_i = max_j K_ij
// and keeps E_ij = exp(K_ij - M_i) (in [0, 1], 1 at each row's maximum). Every later log-sum-exp
// is then a matrix-vector product with E, an FMA per element instead of an exp:
//   LSE_j(K_ij + g_j/eps) = M_i + gmax + log sum_j E_ij y_j,  y_j = exp(g_j/eps - gmax),
//   LSE_i(K_ij + f_i/eps) = hmax + log sum_i E_ij w_i,      w_i = exp(M_i + f_i/eps - hmax),
// gmax and hmax being the maxima of the exponents, so y, w <= 1 with a 1 among them. The
// potentials stay the state (y and w are recomputed from them each pass), so nothing drifts.
// Entries of E, y, w or their products below exp(-87) (vexp's floor) are off by at most that much,
// which moves a sum by at most len * exp(-87); a sum below 2^-64 (where that could matter), or not
// finite (non-finite input), is redone by the exact pass. The same as the GPU cluster kernel
// (csrc/include/topv/sinkhorn_cluster.cuh), with E for its Q.
constexpr float kMinFastSum = 5.421010862427522e-20f;  // 2^-64

bool fast_sum_ok(float x) { return x >= kMinFastSum && x <= std::numeric_limits<float>::max(); }

TOPV_VEC_CLONES float dot_row(const float* e, const float* y, int64_t m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) s += e[j] * y[j];
  return s;
}

TOPV_VEC_CLONES void axpy_row(float* acc, const float* e, float w, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) acc[j] += w * e[j];
}

// exp(v[k] - vmax) into out; returns vmax (NaN in v makes the callers' sums NaN: exact path).
TOPV_VEC_CLONES float shifted_exp(const float* v, float scale, int64_t len, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < len; ++k) {
    const float x = v[k] * scale;
    mx = x > mx ? x : mx;
  }
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = vexp(v[k] * scale - mx);
  return mx;
}

// E's row i: e_j = exp(-c_j/eps - M_i) with M_i = max_j -c_j/eps; returns the row sum.
TOPV_VEC_CLONES float exp_row(float* e, const float* c, int64_t m, float inv_eps, float& mx_out) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) {
    const float v = -c[j] * inv_eps;
    mx = v > mx ? v : mx;
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < m; ++j) {
    const float v = vexp(-c[j] * inv_eps - mx);
    e[j] = v;
    s += v;
  }
  mx_out = mx;
  return s;
}

struct FastState {
  ScratchBuffer scratch;
  float* E;                 // (n, m), every element written by the first row pass
  std::vector<float> M;     // (n,)
  std::vector<float> y, w;  // (m,) and (n,)
  explicit FastState(const Problem& P)
      : E(scratch.get<float>(Scratch::kPlan, static_cast<size_t>(P.n * P.m))), M(P.n), y(P.m), w(P.n) {}
};

// The first row pass (g = 0, exact): f'_i = kappa_a eps (log a_i - M_i - log sum_j E_ij), filling E
// and M.
void first_row_pass(const Problem& P, float eps, FastState& S, float* f_next) {
  const float inv_eps = 1.0f / eps, la_uniform = -std::log(static_cast<float>(P.n));
  pfor(*P.rt, 0, P.n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float s = exp_row(S.E + i * P.m, P.C + i * P.m, P.m, inv_eps, S.M[i]);
      const float la = P.log_a ? P.log_a[i] : la_uniform;
      f_next[i] = P.relax.kappa_a * eps * (la - (S.M[i] + std::log(s)));
    }
  });
}

// f'_i = kappa_a eps (log a_i - L_i) with L_i = LSE_j((g_j - C_ij)/eps); with `mass`, also the row
// mass exp(f_i/eps + L_i) of the plan (f, g) and its relaxed violation |mass_i - a_i exp(-f_i/τ_a)|.
// Rows in parallel.
void row_pass(const Problem& P, FastState& S, const float* f, const float* g, float eps, float* f_next, float* mass,
              float* viol) {
  const float inv_eps = 1.0f / eps, la_uniform = -std::log(static_cast<float>(P.n));
  const float gmax = shifted_exp(g, inv_eps, P.m, S.y.data());
  pfor(*P.rt, 0, P.n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float sum = dot_row(S.E + i * P.m, S.y.data(), P.m);
      const float lse = fast_sum_ok(sum) ? S.M[i] + gmax + std::log(sum) : row_lse_exact(P, i, g, inv_eps);
      const float la = P.log_a ? P.log_a[i] : la_uniform;
      f_next[i] = P.relax.kappa_a * eps * (la - lse);
      if (mass) {
        const float fi = f[i] * inv_eps;
        mass[i] = std::exp(fi + lse);
        viol[i] = std::fabs(mass[i] - std::exp(la - P.relax.rho_a * fi));
      }
    }
  });
}

// g_j = eps (log b_j - LSE_i((f_i - C_ij)/eps)). Column blocks in parallel; within a block the
// loops run along rows of E so the inner loop over j is contiguous and vectorises.
void col_pass(const Problem& P, FastState& S, const float* f, float eps, float* g) {
  const float inv_eps = 1.0f / eps, lb_uniform = -std::log(static_cast<float>(P.m));
  std::vector<float> h(P.n);
  for (int64_t i = 0; i < P.n; ++i) h[i] = S.M[i] + f[i] * inv_eps;
  const float hmax = shifted_exp(h.data(), 1.0f, P.n, S.w.data());
  pfor(*P.rt, 0, P.m, 256, [&](int64_t j0, int64_t j1) {
    const int64_t w = j1 - j0;
    std::vector<float> sum(w, 0.0f), lse(w);
    for (int64_t i = 0; i < P.n; ++i) axpy_row(sum.data(), S.E + i * P.m + j0, S.w[i], w);
    bool exact = false;
    for (int64_t j = 0; j < w; ++j) {
      lse[j] = hmax + std::log(sum[j]);
      exact |= !fast_sum_ok(sum[j]);
    }
    if (exact) {  // rare (see above): redo the block's columns that need it from C
      std::vector<float> lse_exact(w);
      col_lse_exact(P, f, inv_eps, j0, w, lse_exact.data());
      for (int64_t j = 0; j < w; ++j)
        if (!fast_sum_ok(sum[j])) lse[j] = lse_exact[j];
    }
    for (int64_t j = 0; j < w; ++j)
      g[j0 + j] = P.relax.kappa_b * eps * ((P.log_b ? P.log_b[j0 + j] : lb_uniform) - lse[j]);
  });
}

void solve(const Problem& P, float eps, int64_t n_iters, float tol, const Result& R) {
  FastState S(P);
  std::fill(R.f, R.f + P.n, 0.0f);
  std::fill(R.g, R.g + P.m, 0.0f);
  std::vector<float> f_next(P.n), mass(P.n), viol(P.n);
  first_row_pass(P, eps, S, f_next.data());
  bool have_next = true;  // f_next already holds the f update from the current g
  for (int64_t t = 0; t < n_iters; ++t) {
    if (!have_next) row_pass(P, S, R.f, R.g, eps, f_next.data(), nullptr, nullptr);
    std::copy(f_next.begin(), f_next.end(), R.f);
    col_pass(P, S, R.f, eps, R.g);
    have_next = false;
    if (tol > 0) {
      row_pass(P, S, R.f, R.g, eps, f_next.data(), mass.data(), viol.data());
      have_next = true;
      if (std::accumulate(viol.begin(), viol.end(), 0.0) < tol) break;
    }
  }
  if (R.score) {
    if (!have_next) row_pass(P, S, R.f, R.g, eps, f_next.data(), mass.data(), viol.data());
    for (int64_t i = 0; i < P.n; ++i) R.score[i] = static_cast<float>(P.n) * mass[i];  // n sum_j P_ij
  }
}

// The float32 cosine s.t |s|^-1 |t|^-1 is safe while each squared norm lies in [2^-60, 2^120]: no
// square, product or sum then overflows, and what flushes to zero moves the cosine by < d 2^-66.
// A finite row outside that range (a zero row, |x| ~ 1e19, whose square is inf in float32, or tiny
// values whose squares underflow) gets the inverse norm +inf instead, and its cosines are computed
// exactly in double (exact_cos), which holds the squares of every float. A non-finite row keeps the
// plain formula (its scores are unspecified and check_finite reports it).
constexpr float kMinSafeSq = 0x1p-60f, kMaxSafeSq = 0x1p120f;

float safe_inv_norm(float ss, bool finite) {
  if (!finite || (ss >= kMinSafeSq && ss <= kMaxSafeSq)) return ss > 0.0f ? 1.0f / std::sqrt(ss) : 0.0f;
  return std::numeric_limits<float>::infinity();
}

inline double to_double(float x) { return x; }
inline double to_double(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// cos(a, b) of two rows of d elements in double (0 when either is zero).
template <typename T>
float exact_cos(const T* a, const T* b, int64_t d) {
  double aa = 0.0, bb = 0.0, ab = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double x = to_double(a[k]), y = to_double(b[k]);
    aa += x * x;
    bb += y * y;
    ab += x * y;
  }
  return aa > 0.0 && bb > 0.0 ? static_cast<float>(ab / (std::sqrt(aa) * std::sqrt(bb))) : 0.0f;
}

// Sum of squares of one row, and a flag sum that is 0 exactly when every element is finite (x - x
// is NaN for Inf and NaN, and the loop stays vectorisable). bf16 widens to fp32 by a shift.
TOPV_VEC_CLONES void sumsq_row(const float* p, int64_t d, float& ss_out, float& z_out) {
  float ss = 0.0f, z = 0.0f;
#pragma omp simd reduction(+ : ss, z)
  for (int64_t k = 0; k < d; ++k) {
    ss += p[k] * p[k];
    z += p[k] - p[k];
  }
  ss_out = ss;
  z_out = z;
}

TOPV_VEC_CLONES void sumsq_row(const uint16_t* p, int64_t d, float& ss_out, float& z_out) {
  float ss = 0.0f, z = 0.0f;
#pragma omp simd reduction(+ : ss, z)
  for (int64_t k = 0; k < d; ++k) {
    const uint32_t bits = static_cast<uint32_t>(p[k]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    ss += v * v;
    z += v - v;
  }
  ss_out = ss;
  z_out = z;
}

// Inverse L2 norms of the rows of x (rows, d), float32 or bfloat16 bits (safe_inv_norm: +inf for
// a row whose cosines need exact_cos); returns true when an element is not finite.
template <typename T>
bool inv_norms(const Runtime& rt, const T* x, int64_t rows, int64_t d, int64_t ld, float* out) {
  std::vector<char> bad(rows, 0);
  pfor(rt, 0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float ss, z;
      sumsq_row(x + r * ld, d, ss, z);
      bad[r] = !(z == 0.0f);
      out[r] = safe_inv_norm(ss, !bad[r]);
    }
  });
  return std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
}

// What the cost epilogue needs besides s_i . t_j: inverse norms and positions of one block, and the
// rows themselves (T: float or bf16 bits) for the exact cosines of rows the float32 one cannot take.
template <typename T>
struct Epilogue {
  const Runtime& rt;
  const T *s, *t;
  int64_t lds, ldt, d;
  std::vector<float> s_inv, t_inv, qr, qc, pr, pc, centre;
  std::vector<int64_t> exact_cols;  // columns whose t_inv is the exact-path sentinel (find_exact_cols)
  float ha, beta, neg_inv_2s2;

  Epilogue(const Runtime& rt_, const T* s_, int64_t lds_, int64_t n, const T* t_, int64_t ldt_, int64_t m, int64_t d_,
           const float* p, int64_t p_ld, const float* q, int64_t q_ld, float alpha, float beta_, float gamma, float sigma)
      : rt(rt_), s(s_), t(t_), lds(lds_), ldt(ldt_), d(d_), s_inv(n), t_inv(m), qr(m), qc(m), pr(n), pc(n), centre(n),
        ha(0.5f * alpha), beta(beta_), neg_inv_2s2(-1.0f / (2.0f * sigma * sigma)) {
    // Coordinates as contiguous arrays so the inner loop is unit-stride.
    for (int64_t j = 0; j < m; ++j) {
      qr[j] = q[j * q_ld];
      qc[j] = q[j * q_ld + 1];
    }
    for (int64_t i = 0; i < n; ++i) {
      pr[i] = p[i * p_ld];
      pc[i] = p[i * p_ld + 1];
      const float dr = pr[i] - kCentre, dc = pc[i] - kCentre;
      centre[i] = gamma * std::sqrt(dr * dr + dc * dc) * kInvMaxCentreDist;
    }
  }

  // Computes the inverse norms (returns true when an element is not finite).
  bool norms() {
    const int64_t n = static_cast<int64_t>(s_inv.size()), m = static_cast<int64_t>(t_inv.size());
    bool bad = inv_norms(rt, s, n, d, lds, s_inv.data());
    bad |= inv_norms(rt, t, m, d, ldt, t_inv.data());
    for (int64_t j = 0; j < m; ++j)
      if (std::isinf(t_inv[j])) exact_cols.push_back(j);
    return bad;
  }

  float exact_cost(int64_t i, int64_t j) const {
    return cost_formula(exact_cos(s + i * lds, t + j * ldt, d), pr[i] - qr[j], pc[i] - qc[j], ha, beta, neg_inv_2s2,
                        centre[i]);
  }

  // Rows [i0, i1) of c (n, m): s_i . t_j on entry, C_ij on exit.
  void apply(float* c, int64_t i0, int64_t i1) const {
    const int64_t m = static_cast<int64_t>(t_inv.size());
    for (int64_t i = i0; i < i1; ++i) {
      float* row = c + i * m;
      if (std::isinf(s_inv[i])) {  // rare: see safe_inv_norm
        for (int64_t j = 0; j < m; ++j) row[j] = exact_cost(i, j);
        continue;
      }
      epilogue_row(row, t_inv.data(), qr.data(), qc.data(), m, s_inv[i], pr[i], pc[i], ha, beta, neg_inv_2s2,
                   centre[i]);
      for (const int64_t j : exact_cols) row[j] = exact_cost(i, j);
    }
  }
};

#ifdef TOPV_BF16_GEMM
// bf16 GEMM on AVX512-BF16. Values travel as pairs (2 consecutive k of one row = one uint32), the
// unit vdpbf16ps works in: acc_j += a_k b_kj + a_{k+1} b_{k+1,j} over 16 columns j. B (= t^T) is
// packed per panel of kPanel columns as [k pair][column] so a panel row is 3 aligned vectors; A
// pairs are broadcast from s in place. A tile is R rows x kPanel columns over the whole K: 24
// accumulators + 3 B vectors + 1 broadcast fit the 32 zmm registers. At n = m = 576, d = 1024 the
// tiles run at over 90% of the machine's vdpbf16ps peak (425-453 of 466 GFLOP/s on the 2-core AMD EPYC
// Zen 5 CI machine, 2026-12-06: vdpbf16ps and vfmadd231ps zmm both issue ~3.65 G/s per core).
constexpr int kVecs = 3;
constexpr int64_t kPanel = 16 * kVecs;
constexpr int kRows = 8;

// Whether this kernel is the faster bf16 path here. On AMD Zen 4/5 vdpbf16ps issues at the FMA
// rate with twice the FLOPs, so it beats fp32 MKL ~2x. On the Intel Xeons that have AMX (Sapphire
// Rapids on) it measured half the fp32 FMA rate (66-74 against ~143 GFLOP/s per core; B=1 prune
// on 16 cores 2.39 ms with bf16 input against 1.43 ms with fp32 input, measured 2026-12-06 on the
// H100 host's Xeon), so there the fp32 path stays. AMX-BF16 is CPUID.(7, 0):EDX[22].
// TOPV_CPU_BF16_GEMM=1 takes the kernel wherever AVX512-BF16 exists (the tests cover it on AMX
// machines that way), =0 never.
bool cpu_has_bf16_dot() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) return false;
    const char* force = std::getenv("TOPV_CPU_BF16_GEMM");
    if (force && *force) return force[0] == '1';
    unsigned a, b, c, d;
    return !(__get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u));
  }();
  return ok;
}

template <int R>
__attribute__((target("avx512f,avx512bf16"))) void bf16_tile(const uint16_t* a, int64_t lda, const uint32_t* b,
                                                               int64_t k2, float* c, int64_t ldc, int64_t w) {
  __m512 acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < k2; ++kp) {
    __m512bh bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = (__m512bh)_mm512_load_si512(b + kp * kPanel + 16 * v);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * kp, sizeof(pair));  // rows of s may start at any 2-byte offset
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    const int64_t left = w - 16 * v;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask, acc[r][v]);
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, int64_t);
constexpr TileFn kTiles[kRows + 1] = {nullptr,      bf16_tile<1>, bf16_tile<2>, bf16_tile<3>, bf16_tile<4>,
                                      bf16_tile<5>, bf16_tile<6>, bf16_tile<7>, bf16_tile<8>};

// out (n, m) = s (n, d) . t (m, d)^T with the epilogue applied, s and t bf16 with row strides
// lds, ldt (unit stride on d).
void bf16_cost_gemm(const uint16_t* s, int64_t lds, int64_t n, const uint16_t* t, int64_t ldt, int64_t m, int64_t d,
                    const Epilogue<uint16_t>& ep, float* out) {
  const int64_t k2 = (d + 1) / 2;
  // An odd d leaves a half pair at the end of each row: such an s is copied with a zero after
  // each row (t's packing below pads the same way).
  std::vector<uint16_t> s_pad;
  if (d % 2) {
    s_pad.assign(n * 2 * k2, 0);
    for (int64_t i = 0; i < n; ++i) std::memcpy(s_pad.data() + i * 2 * k2, s + i * lds, d * sizeof(uint16_t));
    s = s_pad.data();
    lds = 2 * k2;
  }
  const int64_t panels = (m + kPanel - 1) / kPanel, panel_size = k2 * kPanel;
  ScratchBuffer scratch;
  uint32_t* bp = scratch.get<uint32_t>(Scratch::kPacked, static_cast<size_t>(panels * panel_size));
  // In blocks of 16 pairs: the reads are a cache line of each of the panel's rows of t, the writes
  // 16 rows of the panel (3 KB), both within L1.
  constexpr int64_t kPackBlock = 16;
  pfor(ep.rt, 0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* dst = bp + p * panel_size;
      for (int64_t kb = 0; kb < k2; kb += kPackBlock) {
        const int64_t kn = std::min(kPackBlock, k2 - kb);
        for (int64_t c = 0; c < kPanel; ++c) {
          const int64_t j = p * kPanel + c;
          const uint16_t* row = t + j * ldt;
          for (int64_t kp = kb; kp < kb + kn; ++kp) {
            uint32_t lo = 0, hi = 0;
            if (j < m) {
              lo = row[2 * kp];
              hi = 2 * kp + 1 < d ? row[2 * kp + 1] : 0;
            }
            dst[kp * kPanel + c] = lo | (hi << 16);
          }
        }
      }
    }
  });
  // A thread takes a block of kRows rows of s across every panel (packed t, K/2 x m x 4 bytes, stays
  // in L2), then applies the epilogue to those full rows while they are in L1.
  const int64_t row_blocks = (n + kRows - 1) / kRows;
  pfor(ep.rt, 0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kRows, rows = std::min<int64_t>(kRows, n - i0);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t j0 = p * kPanel;
        kTiles[rows](s + i0 * lds, lds, bp + p * panel_size, k2, out + i0 * m + j0, m, std::min(kPanel, m - j0));
      }
      ep.apply(out, i0, i0 + rows);
    }
  });
}
#endif

// Feature rows as the GEMMs take them: bf16 bits as they are where the bf16 kernel runs, else
// float32 (a view of float32 input, a converted copy of float16 / bfloat16 in `keep`).
struct Rows {
  const void* data;
  int64_t ld;
  bool bf16;
};

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    uint32_t e = 113u, mm = man;
    while (!(mm & 0x400u)) mm <<= 1, --e;
    bits = sign | (e << 23) | ((mm & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

TOPV_VEC_CLONES void widen_bf16_row(const uint16_t* x, int64_t d, float* out) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    const uint32_t bits = uint32_t(x[k]) << 16;
    std::memcpy(out + k, &bits, sizeof(float));
  }
}

Rows gemm_rows(const Runtime& rt, const void* data, DType dt, int64_t rows, int64_t d, int64_t ld,
               std::vector<float>& keep) {
  if (dt == DType::kFloat32) return {data, ld, false};
  if (dt == DType::kBFloat16 && has_bf16_gemm()) return {data, ld, true};
  keep.resize(static_cast<size_t>(rows * d));
  const auto* x = static_cast<const uint16_t*>(data);
  pfor(rt, 0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (dt == DType::kBFloat16) {
        widen_bf16_row(x + r * ld, d, keep.data() + r * d);
      } else {
        for (int64_t k = 0; k < d; ++k) keep[r * d + k] = half_to_float(x[r * ld + k]);
      }
    }
  });
  return {keep.data(), d, false};
}

// C (n, m) = cost of rows s (n, d) against t (m, d) (both as gemm_rows made them), the positions
// p (n, 2) / q (m, 2) at row strides p_ld / q_ld; returns whether a feature was not finite.
bool cost_block(const Runtime& rt, Rows s, int64_t n, Rows t, int64_t m, int64_t d, const float* p, int64_t p_ld,
                const float* q, int64_t q_ld, const CostParams& cp, float* out) {
#ifdef TOPV_BF16_GEMM
  if (s.bf16) {
    const auto* sp = static_cast<const uint16_t*>(s.data);
    const auto* tp = static_cast<const uint16_t*>(t.data);
    Epilogue<uint16_t> ep(rt, sp, s.ld, n, tp, t.ld, m, d, p, p_ld, q, q_ld, cp.alpha, cp.beta, cp.gamma, cp.sigma);
    const bool bad = ep.norms();
    bf16_cost_gemm(sp, s.ld, n, tp, t.ld, m, d, ep, out);
    return bad;
  }
#endif
  const auto* sp = static_cast<const float*>(s.data);
  const auto* tp = static_cast<const float*>(t.data);
  Epilogue<float> ep(rt, sp, s.ld, n, tp, t.ld, m, d, p, p_ld, q, q_ld, cp.alpha, cp.beta, cp.gamma, cp.sigma);
  const bool bad = ep.norms();
  (rt.sgemm_nt ? rt.sgemm_nt : builtin_sgemm_nt)(n, m, d, sp, s.ld, tp, t.ld, out);
  pfor(rt, 0, n, 32, [&](int64_t i0, int64_t i1) { ep.apply(out, i0, i1); });
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

}  // namespace

bool has_bf16_gemm() {
#ifdef TOPV_BF16_GEMM
  return cpu_has_bf16_dot();
#else
  return false;
#endif
}

bool cost_matrix(const CostArgs& a, float* out, bool* nonfinite, const Runtime& rt) {
  if (!cost_args_ok(a) || !out) return false;
  bool bad = false;
  for (int64_t b = 0; b < a.batch; ++b) {
    std::vector<float> ks, kt;
    const size_t es = a.dtype == DType::kFloat32 ? 4 : 2;
    const auto* sb = static_cast<const char*>(a.source) + es * size_t(b * a.source_batch_stride);
    const auto* tb = static_cast<const char*>(a.target) + es * size_t(b * a.target_batch_stride);
    const Rows s = gemm_rows(rt, sb, a.dtype, a.n, a.d, a.source_row_stride, ks);
    const Rows t = gemm_rows(rt, tb, a.dtype, a.m, a.d, a.target_row_stride, kt);
    bad |= cost_block(rt, s, a.n, t, a.m, a.d, a.src_pos + b * a.src_pos_batch_stride, a.src_pos_row_stride,
                      a.tgt_pos + b * a.tgt_pos_batch_stride, a.tgt_pos_row_stride, a.cost, out + b * a.n * a.m);
  }
  if (nonfinite) *nonfinite = bad;
  return true;
}

bool sinkhorn(const SinkhornArgs& a, float* f, float* g, const Runtime& rt) {
  if (!sinkhorn_args_ok(a) || !f || !g) return false;
  const SinkhornParams& p = a.sinkhorn;
  const Relax relax(p.eps, a.tau_a, a.tau_b);
  const int64_t n = a.n, m = a.m;
  pfor(rt, 0, a.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Problem P{a.cost + b * n * m, n, m, a.log_a ? a.log_a + b * n : nullptr,
                      a.log_b ? a.log_b + b * m : nullptr, relax, &rt};
      solve(P, p.eps, p.n_iters, p.tol, Result{f + b * n, g + b * m, nullptr});
    }
  });
  return true;
}

bool prune(const PruneArgs& a, int64_t* kept, float* scores, int* nonfinite, const Runtime& rt) {
  if (!prune_args_ok(a) || !kept || !scores) return false;
  const int64_t S = a.num_segments, T = a.total_rows;
  const Relax relax(a.sinkhorn.eps, a.tau, std::numeric_limits<double>::infinity());
  std::vector<int64_t> starts(S), out_starts(S);
  for (int64_t k = 0, r = 0, o = 0; k < S; r += a.seg_lens[k], o += a.keep[k], ++k) {
    starts[k] = r;
    out_starts[k] = o;
  }
  const size_t es = a.dtype == DType::kFloat32 ? 4 : 2;
  const bool shared_pos = a.position_rows != T;
  std::vector<char> bad(S, 0);
  // Many segments: one per thread. Few: each segment's loops use the threads instead (a nested
  // parallel_for runs inline).
  pfor(rt, 0, S, S >= threads_of(rt) ? 1 : S, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n = a.seg_lens[k], r0 = starts[k];
      ScratchBuffer scratch;
      float* C = scratch.get<float>(Scratch::kCost, static_cast<size_t>(n * n));
      std::vector<float> f(n), g(n), ks, kt;
      const Rows s = gemm_rows(rt, static_cast<const char*>(a.source) + es * size_t(r0 * a.source_row_stride), a.dtype,
                               n, a.d, a.source_row_stride, ks);
      const Rows t = gemm_rows(rt, static_cast<const char*>(a.target) + es * size_t(r0 * a.target_row_stride), a.dtype,
                               n, a.d, a.target_row_stride, kt);
      const float* p = a.positions + (shared_pos ? 0 : 2 * r0);
      bad[k] = cost_block(rt, s, n, t, n, a.d, p, 2, p, 2, a.cost, C);
      solve(Problem{C, n, n, nullptr, nullptr, relax, &rt}, a.sinkhorn.eps, a.sinkhorn.n_iters, a.sinkhorn.tol,
            Result{f.data(), g.data(), scores + r0});
      select(scores + r0, n, a.keep[k], a.recover_ratio, a.padded ? 0 : r0, kept + out_starts[k]);
    }
  });
  if (a.check_finite && nonfinite) {
    bool any = std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
    for (int64_t i = 0; i < 2 * a.position_rows && !any; ++i) any = !std::isfinite(a.positions[i]);
    *nonfinite = any ? 1 : 0;
  }
  return true;
}

}  // namespace cpu
}  // namespace topv
