// Standalone check and benchmark of the 16-bit tensor-core cost GEMMs (topv/cost.cuh: mma.sync;
// topv/cost_wgmma.cuh: wgmma, sm_90a), plain CUDA runtime, no torch:
//   nvcc -std=c++17 -O3 --use_fast_math -arch=sm_90a -DTOPV_HAS_SM90A -Icsrc/include csrc/tests/gemm_check.cu -o /tmp/gemm_check
// (-arch=sm_90 without the macro checks the mma.sync kernels only; no -lcuda: the wgmma launcher gets
// cuTensorMapEncodeTiled through the runtime.)
// 1. Correctness, bf16 and fp16: odd sizes (n = 1, 7, 33, 193, 577), d = 72 / 4100 (not a multiple
//    of 8: the element-wise path) / 4096, row strides larger than d, tables of 2 and 3 segments of
//    different sizes (n = 576: whole 192 x 192 tiles), a rectangular segment, a zero row
//    (inv_norm's 0 branch) and the done flags. Every tile config (the wgmma ones where the device
//    runs them, for inputs their TMA tensor maps take) is run explicitly as well as through the
//    launcher's own choice, PARTIAL = false and PARTIAL = true with 1, 3, 5 splits and the
//    launcher's split count. The reference is one thread per output (fp32 dot and sums of
//    squares, the same cost_value). Outputs are poisoned with NaN first, so an element never
//    written fails, and the gaps between segments and the buffer tail must stay poisoned (no stray
//    writes).
// 2. Timing (median of 50 after warm-up, cudaEvent) of (a) B = 1, n = 576, d = 4096 (split-K),
//    (b) B = 16 / 64, n = 576, d = 4096, (c) a 3072 x 16384 row chunk with d = 3584, (d) B = 1,
//    n = 2880, d = 4096, bf16, for the launcher's choice and for every config (to calibrate the
//    launcher's model).
// Prints "ALL OK" and returns 0 when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "topv/cost_launch.cuh"

using namespace topv;
using namespace topv::detail;

#define CHECK(x)                                                                                 \
  do {                                                                                           \
    cudaError_t e_ = (x);                                                                        \
    if (e_ != cudaSuccess) {                                                                     \
      std::printf("CUDA error %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

// ------------------------------------------------------------------------------------ kernels

__device__ __forceinline__ float hash_unit(uint64_t i, uint32_t seed) {  // uniform in [0, 1)
  uint64_t x = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return float(uint32_t(x >> 40)) * (1.0f / 16777216.0f);
}
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half_rn(v); }

template <typename T>
__global__ void fill_kernel(T* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    store_as(p + i, 2.0f * hash_unit(i, seed) - 1.0f);
}
__global__ void fill_pos_kernel(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = hash_unit(i, seed);
}

// One thread per output: fp32 dot, fp32 sums of squares, the library's cost formula (cost_checked:
// the zero row of the zero_row case takes the exact path there).
template <typename T>
__global__ void ref_kernel(GemmArgs a, GemmTable tab, float* refC, float* refDot, float* refSqS, float* refSqT) {
  const GemmSeg& sg = tab.seg[blockIdx.z];
  const int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= sg.rows || c >= sg.cols) return;
  const T* s = static_cast<const T*>(a.S) + sg.s_off + int64_t(r) * a.lds;
  const T* t = static_cast<const T*>(a.T) + sg.t_off + int64_t(c) * a.ldt;
  float dot = 0.0f, ss = 0.0f, st = 0.0f;
  for (int64_t k = 0; k < a.d; ++k) {
    const float x = to_float(s[k]), y = to_float(t[k]);
    dot = fmaf(x, y, dot);
    ss = fmaf(x, x, ss);
    st = fmaf(y, y, st);
  }
  const int64_t o = sg.c_off + int64_t(r) * sg.cols + c;
  refDot[o] = dot;
  refC[o] = cost_checked(a, sg, r, c, dot, inv_norm(ss) * inv_norm(st));
  if (c == 0) refSqS[sg.sq_off + r] = ss;
  if (r == 0) refSqT[sg.sq_off + c] = st;
}

// What a split-K consumer does: sum the partials, then the cost formula.
__global__ void finish_partial_kernel(GemmArgs a, GemmTable tab, const float* part, float* C, float* dotOut) {
  const GemmSeg& sg = tab.seg[blockIdx.z];
  const int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= sg.rows || c >= sg.cols) return;
  const int64_t o = sg.c_off + int64_t(r) * sg.cols + c;
  float dot = 0.0f, ss = 0.0f, st = 0.0f;
  for (int q = 0; q < a.splits; ++q) {
    dot += part[q * a.part_stride + o];
    ss += a.sq_s[q * a.sq_stride + sg.sq_off + r];
    st += a.sq_t[q * a.sq_stride + sg.sq_off + c];
  }
  dotOut[o] = dot;
  C[o] = cost_checked(a, sg, r, c, dot, inv_norm(ss) * inv_norm(st));
}

// ------------------------------------------------------------------------------------ host

// Model indices of cost.cuh: mma.sync configs, then wgmma configs.
const char* kCfgName[] = {"128x256/8w", "128x192/6w", "128x128/4w", "64x64/4w",
                          "wg 128x256", "wg 128x192", "wg 128x128", "wg 192x192"};
static_assert(sizeof(kCfgName) / sizeof(kCfgName[0]) == kTcConfigs + kWgConfigs, "a name per config");
constexpr int kAllConfigs = kTcConfigs + kWgConfigs;  // launch_cfg(kAllConfigs): the launcher's pick

// Whether config cfg can run here: the wgmma kernel needs wg_available() and inputs its tensor maps
// take (tma: vec && wg_tma_ok).
bool runs(int cfg, bool tma) { return cfg < kTcConfigs || cfg == kAllConfigs || (tma && wg_available()); }

template <typename T, bool PARTIAL>
cudaError_t launch_cfg(int cfg, const GemmArgs& a, const GemmTable& tab, int cnt, int mr, int mc, bool vec,
                       int sm, cudaStream_t st) {
  return cfg == kAllConfigs ? launch_cost_gemm_tc<T, PARTIAL>(a, tab, cnt, mr, mc, vec, sm, st)  // the launcher's pick
                            : launch_cost_gemm_config<T, PARTIAL>(cfg, a, tab, cnt, mr, mc, vec, st);
}

struct SegSpec {
  int rows, cols;
};

struct Case {
  std::string name;
  std::vector<SegSpec> segs;
  int64_t d, lds, ldt;
  int s_misalign = 0;  // element offset of the data (3: breaks 16-byte alignment -> VEC = false; 8: VEC, but
                       // segment offsets are not whole rows -> no tensor map)
  bool zero_row = false, done_flags = false;
};

static int g_fail = 0;

struct Problem {
  int cnt = 0, max_r = 1, max_c = 1;
  int64_t total_rows = 0, c_elems = 0;
  GemmTable tab{};
  std::vector<char> in_seg;  // C elements that belong to a segment
};

Problem layout(const Case& cs) {
  Problem p;
  p.cnt = int(cs.segs.size());
  int64_t row = 0, c = 0;
  for (int k = 0; k < p.cnt; ++k) {
    const SegSpec s = cs.segs[k];
    GemmSeg& g = p.tab.seg[k];
    g.s_off = (row * cs.lds) + cs.s_misalign;
    g.t_off = (row * cs.ldt) + cs.s_misalign;
    g.c_off = c;
    g.p_off = int(row * 2);
    g.q_off = int(row * 2);
    g.rows = s.rows;
    g.cols = s.cols;
    g.id = k;
    g.sq_off = int(row);
    row += std::max(s.rows, s.cols) + 3;  // + 3: gap rows
    c += int64_t(s.rows) * s.cols + 37;   // + 37: a gap that must stay poisoned
    p.max_r = std::max(p.max_r, s.rows);
    p.max_c = std::max(p.max_c, s.cols);
  }
  p.total_rows = row;
  p.c_elems = c;
  p.in_seg.assign(size_t(c), 0);
  for (int k = 0; k < p.cnt; ++k)
    for (int64_t e = 0; e < int64_t(p.tab.seg[k].rows) * p.tab.seg[k].cols; ++e) p.in_seg[p.tab.seg[k].c_off + e] = 1;
  return p;
}

bool is_poison(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u == 0xFFFFFFFFu;
}

// Compares got against ref over the segments (tolerance tol * max(1, scale)); poison elsewhere.
// skip_seg: a segment the done flags skip (must stay poisoned).
bool compare(const char* what, const std::vector<float>& got, const std::vector<float>& ref,
             const std::vector<float>* scale, const Problem& p, int skip_seg, double tol) {
  double worst = 0.0;
  int64_t bad = 0, first_bad = -1;
  for (int64_t e = 0; e < int64_t(got.size()); ++e) {
    const bool inside = e < p.c_elems && p.in_seg[e];
    bool seg_skipped = false;
    if (inside && skip_seg >= 0) {
      const GemmSeg& g = p.tab.seg[skip_seg];
      seg_skipped = e >= g.c_off && e < g.c_off + int64_t(g.rows) * g.cols;
    }
    if (!inside || seg_skipped) {
      if (!is_poison(got[e])) {
        if (first_bad < 0) first_bad = e;
        ++bad;
      }
      continue;
    }
    const double sc = scale ? std::max(1.0, double((*scale)[e])) : std::max(1.0, std::fabs(double(ref[e])));
    const double err = std::fabs(double(got[e]) - double(ref[e])) / sc;
    if (!(err <= tol)) {
      if (first_bad < 0) first_bad = e;
      ++bad;
    }
    if (err > worst || err != err) worst = err;
  }
  if (bad) {
    std::printf("    FAIL %s: %lld bad elements (first %lld: got %g, ref %g), worst rel err %.3g\n", what,
                (long long)bad, (long long)first_bad, got[first_bad],
                first_bad < int64_t(ref.size()) ? ref[first_bad] : 0.0f, worst);
    ++g_fail;
    return false;
  }
  return true;
}

template <typename T>
void run_case(const Case& cs, int sm, cudaStream_t st) {
  Problem p = layout(cs);
  const int64_t s_elems = p.total_rows * cs.lds + cs.s_misalign + 8, t_elems = p.total_rows * cs.ldt + cs.s_misalign + 8;
  T *S = nullptr, *Tm = nullptr;
  float *P = nullptr, *C = nullptr, *sq = nullptr, *refC = nullptr, *refDot = nullptr, *refSq = nullptr,
        *finC = nullptr, *finDot = nullptr;
  int* done = nullptr;
  CHECK(cudaMalloc(&S, s_elems * sizeof(T)));
  CHECK(cudaMalloc(&Tm, t_elems * sizeof(T)));
  CHECK(cudaMalloc(&P, p.total_rows * 2 * sizeof(float)));
  fill_kernel<T><<<256, 256, 0, st>>>(S, size_t(s_elems), 1u);
  fill_kernel<T><<<256, 256, 0, st>>>(Tm, size_t(t_elems), 2u);
  fill_pos_kernel<<<64, 256, 0, st>>>(P, size_t(p.total_rows * 2), 3u);
  if (cs.zero_row) CHECK(cudaMemsetAsync(S + p.tab.seg[0].s_off, 0, cs.d * sizeof(T), st));  // row 0 of seg 0
  const int kMaxSplits = 8;
  const int64_t tail = 64;
  const int64_t c_alloc = p.c_elems * kMaxSplits + tail;
  CHECK(cudaMalloc(&C, c_alloc * sizeof(float)));
  CHECK(cudaMalloc(&sq, 2 * kMaxSplits * p.total_rows * sizeof(float)));
  CHECK(cudaMalloc(&refC, p.c_elems * sizeof(float)));
  CHECK(cudaMalloc(&refDot, p.c_elems * sizeof(float)));
  CHECK(cudaMalloc(&refSq, 2 * p.total_rows * sizeof(float)));
  CHECK(cudaMalloc(&finC, (p.c_elems + tail) * sizeof(float)));
  CHECK(cudaMalloc(&finDot, (p.c_elems + tail) * sizeof(float)));
  if (cs.done_flags) {
    std::vector<int> h(p.cnt, 0);
    h[1 % p.cnt] = 1;
    CHECK(cudaMalloc(&done, p.cnt * sizeof(int)));
    CHECK(cudaMemcpy(done, h.data(), p.cnt * sizeof(int), cudaMemcpyHostToDevice));
  }
  const int skip = cs.done_flags ? 1 % p.cnt : -1;

  const float sigma = 0.2f;
  GemmArgs a{};
  a.S = S;
  a.T = Tm;
  a.lds = cs.lds;
  a.ldt = cs.ldt;
  a.d = cs.d;
  a.P = P;
  a.Q = P;
  a.p_rs = 2;
  a.q_rs = 2;
  a.C = C;
  a.done = done;
  a.half_alpha = 0.5f;
  a.beta = 1.0f;
  a.neg_inv_2s2 = -1.0f / (2.0f * sigma * sigma);
  a.gamma = 0.3f;
  a.sq_s = sq;
  a.sq_t = sq + kMaxSplits * p.total_rows;
  a.part_stride = p.c_elems;
  a.sq_stride = p.total_rows;
  a.splits = 1;
  a.dtype = std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16;

  // Reference (computed for all segments, done flags or not).
  CHECK(cudaMemsetAsync(refC, 0xFF, p.c_elems * sizeof(float), st));
  {
    GemmArgs ra = a;
    ra.done = nullptr;
    ref_kernel<T><<<dim3(unsigned((p.max_c + 127) / 128), unsigned(p.max_r), unsigned(p.cnt)), 128, 0, st>>>(
        ra, p.tab, refC, refDot, refSq, refSq + p.total_rows);
    CHECK(cudaGetLastError());
  }
  std::vector<float> hRefC(p.c_elems), hRefDot(p.c_elems), hRefSq(2 * p.total_rows), hScale(p.c_elems);
  CHECK(cudaStreamSynchronize(st));
  CHECK(cudaMemcpy(hRefC.data(), refC, p.c_elems * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hRefDot.data(), refDot, p.c_elems * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hRefSq.data(), refSq, 2 * p.total_rows * 4, cudaMemcpyDeviceToHost));
  for (int k = 0; k < p.cnt; ++k) {  // |dot| <= |s| |t|: the scale for dot-product errors
    const GemmSeg& g = p.tab.seg[k];
    for (int r = 0; r < g.rows; ++r)
      for (int c = 0; c < g.cols; ++c)
        hScale[g.c_off + int64_t(r) * g.cols + c] =
            std::sqrt(hRefSq[g.sq_off + r]) * std::sqrt(hRefSq[p.total_rows + g.sq_off + c]);
  }

  bool vec = cs.d % 8 == 0 && cs.lds % 8 == 0 && cs.ldt % 8 == 0 && reinterpret_cast<uintptr_t>(S) % 16 == 0 &&
             reinterpret_cast<uintptr_t>(Tm) % 16 == 0;
  for (int k = 0; k < p.cnt; ++k) vec = vec && p.tab.seg[k].s_off % 8 == 0 && p.tab.seg[k].t_off % 8 == 0;
  const bool tma = vec && wg_tma_ok(a, p.tab, p.cnt);
  bool square = true;
  for (int k = 0; k < p.cnt; ++k) square = square && p.tab.seg[k].rows == p.tab.seg[k].cols;
  const int auto_splits = cost_gemm_tc_splits(p.cnt, p.max_r, p.max_c, cs.d, sm);
  const int auto_cfg = tc_pick_config(p.cnt, p.max_r, p.max_c, cs.d, sm, 1, false, tma && wg_available());
  std::printf("  %s [%s, vec=%d, tma=%d, launcher: %s, splits %d]\n", cs.name.c_str(),
              std::is_same<T, __half>::value ? "fp16" : "bf16", int(vec), int(tma), kCfgName[auto_cfg],
              auto_splits);

  std::vector<float> hC(c_alloc), hSq(2 * kMaxSplits * p.total_rows);
  const int fails_before = g_fail;
  for (int cfg = 0; cfg <= kAllConfigs; ++cfg) {
    if (!runs(cfg, tma)) continue;
    const std::string cname = cfg < kAllConfigs ? kCfgName[cfg] : "auto";
    // PARTIAL = false
    CHECK(cudaMemsetAsync(C, 0xFF, c_alloc * sizeof(float), st));
    CHECK((launch_cfg<T, false>(cfg, a, p.tab, p.cnt, p.max_r, p.max_c, vec, sm, st)));
    CHECK(cudaStreamSynchronize(st));
    {
      std::vector<float> h1(p.c_elems + tail);
      CHECK(cudaMemcpy(h1.data(), C, h1.size() * 4, cudaMemcpyDeviceToHost));
      compare((cname + " cost").c_str(), h1, hRefC, nullptr, p, skip, 1e-4);
    }
    if (!square) continue;  // split-K segments are square
    // PARTIAL = true
    for (int splits : {1, 3, 5, -1}) {
      GemmArgs pa = a;
      pa.splits = splits > 0 ? splits : std::min(auto_splits, kMaxSplits);
      if (splits < 0 && cfg != kAllConfigs) continue;  // the launcher's split count: auto config only
      CHECK(cudaMemsetAsync(C, 0xFF, c_alloc * sizeof(float), st));
      CHECK(cudaMemsetAsync(sq, 0xFF, 2 * kMaxSplits * p.total_rows * sizeof(float), st));
      CHECK(cudaMemsetAsync(finC, 0xFF, (p.c_elems + tail) * sizeof(float), st));
      CHECK(cudaMemsetAsync(finDot, 0xFF, (p.c_elems + tail) * sizeof(float), st));
      CHECK((launch_cfg<T, true>(cfg, pa, p.tab, p.cnt, p.max_r, p.max_c, vec, sm, st)));
      CHECK(cudaGetLastError());
      {
        int live = 0;  // the finisher skips the done segment (its partials are never written)
        GemmTable t2{};
        for (int k = 0; k < p.cnt; ++k)
          if (k != skip) t2.seg[live++] = p.tab.seg[k];
        finish_partial_kernel<<<dim3(unsigned((p.max_c + 127) / 128), unsigned(p.max_r), unsigned(live)), 128, 0,
                                st>>>(pa, t2, C, finC, finDot);
        CHECK(cudaGetLastError());
      }
      CHECK(cudaStreamSynchronize(st));
      std::vector<float> f(p.c_elems + tail), fd(p.c_elems + tail);
      CHECK(cudaMemcpy(f.data(), finC, f.size() * 4, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(fd.data(), finDot, fd.size() * 4, cudaMemcpyDeviceToHost));
      const std::string tag = cname + " split " + std::to_string(pa.splits);
      compare((tag + " cost").c_str(), f, hRefC, nullptr, p, skip, 1e-4);
      compare((tag + " dot").c_str(), fd, hRefDot, &hScale, p, skip, 1e-4);
      // Split partials beyond splits * part_stride must stay poisoned; so must the gaps of each split.
      CHECK(cudaMemcpy(hC.data(), C, c_alloc * 4, cudaMemcpyDeviceToHost));
      {
        int64_t stray = 0;
        for (int q = 0; q < kMaxSplits; ++q)
          for (int64_t e = 0; e < p.c_elems; ++e) {
            const bool written = q < pa.splits && p.in_seg[e];
            bool sk = false;
            if (skip >= 0) {
              const GemmSeg& g = p.tab.seg[skip];
              sk = e >= g.c_off && e < g.c_off + int64_t(g.rows) * g.cols;
            }
            const float v = hC[q * p.c_elems + e];
            if (written && !sk ? is_poison(v) : !is_poison(v)) ++stray;
          }
        for (int64_t e = kMaxSplits * p.c_elems; e < c_alloc; ++e) stray += !is_poison(hC[e]);
        if (stray) {
          std::printf("    FAIL %s: %lld partial elements written where they should not be / missing\n",
                      tag.c_str(), (long long)stray);
          ++g_fail;
        }
      }
      // Partial sums of squares, summed over the splits.
      CHECK(cudaMemcpy(hSq.data(), sq, hSq.size() * 4, cudaMemcpyDeviceToHost));
      {
        int64_t badsq = 0;
        for (int k = 0; k < p.cnt; ++k) {
          if (k == skip) continue;
          const GemmSeg& g = p.tab.seg[k];
          for (int side = 0; side < 2; ++side)
            for (int r = 0; r < (side ? g.cols : g.rows); ++r) {
              double s = 0.0;
              for (int q = 0; q < pa.splits; ++q) s += hSq[side * kMaxSplits * p.total_rows + q * p.total_rows + g.sq_off + r];
              const double ref = hRefSq[side * p.total_rows + g.sq_off + r];
              if (!(std::fabs(s - ref) <= 1e-4 * std::max(1.0, ref))) ++badsq;
            }
        }
        if (badsq) {
          std::printf("    FAIL %s: %lld bad sums of squares\n", tag.c_str(), (long long)badsq);
          ++g_fail;
        }
      }
    }
  }
  if (g_fail == fails_before) std::printf("    ok\n");
  cudaFree(S);
  cudaFree(Tm);
  cudaFree(P);
  cudaFree(C);
  cudaFree(sq);
  cudaFree(refC);
  cudaFree(refDot);
  cudaFree(refSq);
  cudaFree(finC);
  cudaFree(finDot);
  if (done) cudaFree(done);
}

// ------------------------------------------------------------------------------------ timing

template <bool PARTIAL>
float time_launch(int cfg, const GemmArgs& a, const GemmTable& tab, int cnt, int mr, int mc, int sm, cudaStream_t st) {
  for (int i = 0; i < 5; ++i) CHECK((launch_cfg<__nv_bfloat16, PARTIAL>(cfg, a, tab, cnt, mr, mc, true, sm, st)));
  std::vector<float> ms;
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 50; ++i) {
    CHECK(cudaEventRecord(e0, st));
    CHECK((launch_cfg<__nv_bfloat16, PARTIAL>(cfg, a, tab, cnt, mr, mc, true, sm, st)));
    CHECK(cudaEventRecord(e1, st));
    CHECK(cudaEventSynchronize(e1));
    float t = 0.0f;
    CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1000.0f;  // us
}

// batch segments of rows x cols, d; PARTIAL with `splits` (0: PARTIAL = false).
void bench(const char* name, int batch, int rows, int cols, int64_t d, int splits, int sm, cudaStream_t st) {
  const int64_t s_rows = int64_t(batch) * rows, t_rows = int64_t(batch) * cols;
  const int64_t c_elems = int64_t(batch) * rows * cols;
  __nv_bfloat16 *S = nullptr, *Tm = nullptr;
  float *P = nullptr, *C = nullptr, *sq = nullptr;
  const int ns = std::max(splits, 1);
  CHECK(cudaMalloc(&S, s_rows * d * 2));
  CHECK(cudaMalloc(&Tm, t_rows * d * 2));
  CHECK(cudaMalloc(&P, std::max(s_rows, t_rows) * 2 * sizeof(float)));
  CHECK(cudaMalloc(&C, c_elems * ns * sizeof(float)));
  CHECK(cudaMalloc(&sq, 2 * std::max(s_rows, t_rows) * ns * sizeof(float)));
  fill_kernel<__nv_bfloat16><<<1024, 256, 0, st>>>(S, size_t(s_rows * d), 5u);
  fill_kernel<__nv_bfloat16><<<1024, 256, 0, st>>>(Tm, size_t(t_rows * d), 6u);
  fill_pos_kernel<<<256, 256, 0, st>>>(P, size_t(std::max(s_rows, t_rows) * 2), 7u);
  GemmTable tab{};
  for (int b = 0; b < batch; ++b)
    tab.seg[b] = GemmSeg{int64_t(b) * rows * d, int64_t(b) * cols * d, int64_t(b) * rows * cols, b * rows * 2,
                         b * cols * 2, rows, cols, b, b * rows};
  GemmArgs a{};
  a.S = S;
  a.T = Tm;
  a.lds = d;
  a.ldt = d;
  a.d = d;
  a.P = P;
  a.Q = P;
  a.p_rs = 2;
  a.q_rs = 2;
  a.C = C;
  a.done = nullptr;
  a.half_alpha = 0.5f;
  a.beta = 1.0f;
  a.neg_inv_2s2 = -1.0f / (2.0f * 0.04f);
  a.gamma = 0.3f;
  a.sq_s = sq;
  a.sq_t = sq + std::max(s_rows, t_rows) * ns;
  a.part_stride = c_elems;
  a.sq_stride = std::max(s_rows, t_rows);
  a.splits = ns;
  a.dtype = DType::kBFloat16;
  const double flop = 2.0 * double(c_elems) * double(d);
  const int pick = tc_pick_config(batch, rows, cols, d, sm, ns, splits > 0, wg_available());
  std::printf("  %s: B=%d %dx%d d=%lld, %s, launcher picks %s\n", name, batch, rows, cols, (long long)d,
              splits > 0 ? ("split-K " + std::to_string(splits)).c_str() : "one split", kCfgName[pick]);
  for (int cfg = kAllConfigs; cfg >= 0; --cfg) {
    if (!runs(cfg, true)) continue;
    const float us = splits > 0 ? time_launch<true>(cfg, a, tab, batch, rows, cols, sm, st)
                                : time_launch<false>(cfg, a, tab, batch, rows, cols, sm, st);
    std::printf("    %-12s %9.2f us  %7.1f TFLOP/s\n", cfg == kAllConfigs ? "auto" : kCfgName[cfg], us,
                flop / (us * 1e-6) / 1e12);
  }
  cudaFree(S);
  cudaFree(Tm);
  cudaFree(P);
  cudaFree(C);
  cudaFree(sq);
}

int main() {
  int dev = 0, sm = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %s, %d SMs, wgmma kernels %s\n", prop.name, sm,
              wg_available() ? "on" : "off (needs an sm_90a build with TOPV_HAS_SM90A and compute capability 9.0)");
  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));

  const std::vector<Case> cases = {
      {"n=1 d=72", {{1, 1}}, 72, 72, 72},
      {"n=7 d=72 strided", {{7, 7}}, 72, 96, 80},
      {"n=33 d=4100 (element-wise)", {{33, 33}}, 4100, 4103, 4100},
      {"n=577 d=4096 zero row", {{577, 577}}, 4096, 4096, 4096, 0, true},
      {"n=577 d=4100 (element-wise)", {{577, 577}}, 4100, 4100, 4100},
      {"3 segments 577/130/65 d=4096 strided", {{577, 577}, {130, 130}, {65, 65}}, 4096, 4160, 4104},
      {"2 segments 576/193 d=1024", {{576, 576}, {193, 193}}, 1024, 1024, 1024},
      {"3 segments 33/577/7 d=72 done flags", {{33, 33}, {577, 577}, {7, 7}}, 72, 72, 72, 0, false, true},
      {"3 segments misaligned base d=256", {{200, 200}, {61, 61}, {300, 300}}, 256, 256, 256, 3},
      // 16-byte aligned but segment offsets not whole rows: vec, no tensor map (mma.sync only).
      {"2 segments offset 8 elements d=256", {{150, 150}, {70, 70}}, 256, 256, 256, 8},
      // Segments at the very end of the tensors: the last tiles' rows past them are TMA zero fill.
      {"segment 1000 rows d=4096 (tail rows)", {{1000, 1000}}, 4096, 4096, 4096},
      {"rectangular 300x1000 d=264", {{300, 1000}}, 264, 264, 272},
      {"2 rectangular segments 129x257, 64x33", {{129, 257}, {64, 33}}, 136, 136, 136},
  };
  std::printf("correctness, bf16:\n");
  for (const Case& c : cases) run_case<__nv_bfloat16>(c, sm, st);
  std::printf("correctness, fp16:\n");
  for (const Case& c : cases) run_case<__half>(c, sm, st);

  std::printf("timing (bf16, median of 50):\n");
  const int sa = cost_gemm_tc_splits(1, 576, 576, 4096, sm);
  bench("(a)", 1, 576, 576, 4096, sa, sm, st);
  bench("(a) no split", 1, 576, 576, 4096, 0, sm, st);
  bench("(b)", 16, 576, 576, 4096, 0, sm, st);
  bench("(b)", 64, 576, 576, 4096, 0, sm, st);
  bench("(c)", 1, 3072, 16384, 3584, 0, sm, st);
  bench("(d)", 1, 2880, 2880, 4096, 0, sm, st);
  CHECK(cudaStreamDestroy(st));
  if (g_fail) {
    std::printf("%d FAILURES\n", g_fail);
    return 1;
  }
  std::printf("ALL OK\n");
  return 0;
}
