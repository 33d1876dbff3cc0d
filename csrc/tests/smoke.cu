// ctest smoke test of the framework-free API on the GPU, on hand-computable cases (plain CUDA).
//  1. cost_matrix: s = t = (1, 0) and s' = (1, 0), t' = (0, 1), all positions at the image centre:
//     C = alpha (1 - cos) / 2 = 0 and 0.5 (the spatial and centre terms vanish).
//  2. prune: 6 identical tokens at one position: every score is exactly 1 (the plan is uniform),
//     so with keep = 4 and recover_ratio = 0.5 the top 2 are tokens {0, 1} (ties go to the lower
//     index) and the recovery picks rest[(2j+1)*4 // 4] = rest[1], rest[3] = tokens 3 and 5.
#include <cmath>
#include <cstdio>
#include <vector>

#include "topv/topv.h"

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      return 1;                                                                    \
    }                                                                              \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  cudaMalloc(&p, v.size() * sizeof(T));
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

int main() {
  int failures = 0;
  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));
  {  // 1. cost matrix, batch 2, n = m = 1, d = 2
    std::vector<float> s{1, 0, 1, 0}, t{1, 0, 0, 1}, pos{0.5f, 0.5f, 0.5f, 0.5f};
    float *ds = to_device(s), *dt = to_device(t), *dp = to_device(pos), *out = nullptr;
    CHECK(cudaMalloc(&out, 2 * sizeof(float)));
    topv::CostArgs a{};
    a.source = ds; a.target = dt; a.dtype = topv::DType::kFloat32;
    a.batch = 2; a.n = 1; a.m = 1; a.d = 2;
    a.source_batch_stride = 2; a.source_row_stride = 2; a.target_batch_stride = 2; a.target_row_stride = 2;
    a.src_pos = dp; a.tgt_pos = dp;
    a.src_pos_batch_stride = 2; a.src_pos_row_stride = 2; a.tgt_pos_batch_stride = 2; a.tgt_pos_row_stride = 2;
    size_t ws_bytes = topv::cost_matrix_workspace_size(a);
    void* ws = nullptr;
    CHECK(cudaMalloc(&ws, ws_bytes));
    CHECK(topv::cost_matrix(a, out, ws, ws_bytes, st));
    float h[2];
    CHECK(cudaMemcpyAsync(h, out, sizeof(h), cudaMemcpyDeviceToHost, st));
    CHECK(cudaStreamSynchronize(st));
    const bool ok = std::fabs(h[0]) < 1e-6f && std::fabs(h[1] - 0.5f) < 1e-6f;
    std::printf("%s cost_matrix: C = %g, %g (want 0, 0.5)\n", ok ? "ok  " : "FAIL", h[0], h[1]);
    failures += !ok;
  }
  {  // 2. prune of 6 identical tokens
    const int n = 6, d = 8;
    std::vector<float> x(n * d);
    for (int i = 0; i < n * d; ++i) x[i] = float(i % d) - 2.5f;
    std::vector<float> pos(2 * n, 0.3f);
    float *dx = to_device(x), *dp = to_device(pos), *scores = nullptr;
    int64_t* kept = nullptr;
    int* bad = nullptr;
    CHECK(cudaMalloc(&scores, n * sizeof(float)));
    CHECK(cudaMalloc(&kept, 4 * sizeof(int64_t)));
    CHECK(cudaMalloc(&bad, sizeof(int)));
    const int64_t lens[1] = {n}, keep[1] = {4};
    topv::PruneArgs a{};
    a.source = dx; a.target = dx; a.dtype = topv::DType::kFloat32;
    a.total_rows = n; a.d = d; a.source_row_stride = d; a.target_row_stride = d;
    a.positions = dp; a.position_rows = n;
    a.seg_lens = lens; a.keep = keep; a.num_segments = 1; a.padded = false;
    a.recover_ratio = 0.5; a.check_finite = true;
    size_t ws_bytes = topv::prune_workspace_size(a);
    void* ws = nullptr;
    CHECK(cudaMalloc(&ws, ws_bytes));
    CHECK(topv::prune(a, kept, scores, bad, ws, ws_bytes, st));
    float hs[n];
    int64_t hk[4];
    int hb = -1;
    CHECK(cudaMemcpyAsync(hs, scores, sizeof(hs), cudaMemcpyDeviceToHost, st));
    CHECK(cudaMemcpyAsync(hk, kept, sizeof(hk), cudaMemcpyDeviceToHost, st));
    CHECK(cudaMemcpyAsync(&hb, bad, sizeof(int), cudaMemcpyDeviceToHost, st));
    CHECK(cudaStreamSynchronize(st));
    bool ok = hb == 0 && hk[0] == 0 && hk[1] == 1 && hk[2] == 3 && hk[3] == 5;
    for (int i = 0; i < n; ++i) ok = ok && std::fabs(hs[i] - 1.0f) < 1e-5f;
    std::printf("%s prune: kept %lld %lld %lld %lld (want 0 1 3 5), score[0] = %g (want 1), nonfinite = %d\n",
                ok ? "ok  " : "FAIL", (long long)hk[0], (long long)hk[1], (long long)hk[2], (long long)hk[3], hs[0], hb);
    failures += !ok;
  }
  CHECK(cudaStreamDestroy(st));
  return failures ? 1 : 0;
}
