// A consumer of the installed C API (plain C++, no CUDA compiler): prunes one segment of 8 tokens on
// the GPU and checks the exact budget and the ascending order. Exits 0 on success.
#include <topv/topv.h>

#include <cstdio>
#include <vector>

template <typename T>
T* device_copy(const std::vector<T>& host) {
  void* p = nullptr;
  cudaMalloc(&p, host.size() * sizeof(T));
  cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("topv_consumer: no CUDA device\n");
    return 1;
  }
  const int n = 8, d = 4, keep = 3;
  std::vector<float> src(n * d), tgt(n * d), pos(n * 2);
  for (int i = 0; i < n * d; ++i) {
    src[i] = float((i * 7) % 5) - 2.0f;
    tgt[i] = float((i * 3) % 7) - 3.0f;
  }
  for (int i = 0; i < n; ++i) pos[2 * i] = (i / 4 + 0.5f) / 2, pos[2 * i + 1] = (i % 4 + 0.5f) / 4;
  float *ds = device_copy(src), *dt = device_copy(tgt), *dp = device_copy(pos);
  float* scores = device_copy(std::vector<float>(n));
  int64_t* kept = device_copy(std::vector<int64_t>(keep));
  int* flag = device_copy(std::vector<int>(1));
  const int64_t lens[] = {n}, keeps[] = {keep};
  topv::PruneArgs a{};
  a.source = ds;
  a.target = dt;
  a.dtype = topv::DType::kFloat32;
  a.total_rows = n;
  a.d = d;
  a.source_row_stride = d;
  a.target_row_stride = d;
  a.positions = dp;
  a.position_rows = n;
  a.seg_lens = lens;
  a.keep = keeps;
  a.num_segments = 1;
  const size_t ws_bytes = topv::prune_workspace_size(a);
  void* ws = nullptr;
  cudaMalloc(&ws, ws_bytes);
  cudaError_t e = topv::prune(a, kept, scores, flag, ws, ws_bytes, nullptr);
  std::vector<int64_t> out(keep);
  if (e == cudaSuccess) e = cudaMemcpy(out.data(), kept, keep * 8, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    std::printf("topv_consumer: %s\n", cudaGetErrorString(e));
    return 1;
  }
  for (int k = 0; k < keep; ++k)
    if (out[k] < 0 || out[k] >= n || (k > 0 && out[k] <= out[k - 1])) {
      std::printf("topv_consumer: bad kept index %lld at %d\n", static_cast<long long>(out[k]), k);
      return 1;
    }
  std::printf("topv_consumer: kept %lld %lld %lld of %d\n", static_cast<long long>(out[0]),
              static_cast<long long>(out[1]), static_cast<long long>(out[2]), n);
  return 0;
}
