// topv: framework-free C++ API of the TopV CUDA kernels (no torch headers).
//
// Another stack (a TensorRT-LLM plugin, a C++ server) links the library that CMakeLists.txt
// builds (or compiles csrc/topv_api.cu itself) and calls these functions with raw device
// pointers, a caller-owned workspace and a stream. Every call only enqueues work on `stream`:
// nothing synchronises with the host, nothing allocates, and the whole sequence can be captured
// in a CUDA graph. The math is docs/algorithm.md.
//
// Layout conventions
// * Features: row r of a (rows, d) matrix starts at data + r * row_stride (elements); the d
//   elements of a row are contiguous. float32, float16 or bfloat16.
// * Positions: float32 (row, col) pairs, pair r at ptr + r * row_stride (floats).
// * Kernel parameters carry per-segment tables by value (up to kMaxSegmentsPerLaunch segments
//   per launch), which needs CUDA 12.1+ on sm_70+ (kernel parameters above 4 KiB).
#pragma once

#include <cuda_runtime_api.h>

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

constexpr int kMaxSegmentsPerLaunch = 128;

// Bytes of device workspace each call needs (256-byte aligned pointer; cost_matrix needs none,
// its row norms come from the GEMM itself, but keeps the parameter for stability). prune keeps its largest
// cost buffer within `cost_buffer_cap` bytes: segments whose n*n fp32 cost does not fit stream it
// in row chunks and recompute them each Sinkhorn pass (n = 16384: 1 GiB whole; streamed it costs
// ~4 GEMMs instead of one).
constexpr size_t kDefaultCostBufferCap = size_t(192) << 20;  // the floor of default_cost_buffer_cap
constexpr double kCostBufferFreeFraction = 0.25;
// The cap the torch launcher uses when none is given: kCostBufferFreeFraction of the current
// device's free memory (cudaMemGetInfo), at least kDefaultCostBufferCap.
size_t default_cost_buffer_cap();
size_t cost_matrix_workspace_size(const CostArgs& args);
size_t sinkhorn_workspace_size(const SinkhornArgs& args);
size_t prune_workspace_size(const PruneArgs& args, size_t cost_buffer_cap = kDefaultCostBufferCap);

// Argument errors return cudaErrorInvalidValue; launch errors are returned as they come.
cudaError_t cost_matrix(const CostArgs& args, float* out, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);
cudaError_t sinkhorn(const SinkhornArgs& args, float* f, float* g, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);
cudaError_t prune(const PruneArgs& args, int64_t* kept, float* scores, int* nonfinite, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream, size_t cost_buffer_cap = kDefaultCostBufferCap);

}  // namespace topv
