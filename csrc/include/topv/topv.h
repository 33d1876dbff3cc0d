// topv: framework-free C++ API of the TopV CUDA kernels (no torch headers).
//
// Another stack (a TensorRT-LLM plugin, a C++ server) links the library that CMakeLists.txt
// builds (or compiles csrc/topv_api.cu itself) and calls these functions with raw device
// pointers, a caller-owned workspace and a stream. Every call only enqueues work on `stream`:
// nothing synchronises with the host, nothing allocates, and the whole sequence can be captured
// in a CUDA graph. The argument structures and their layout conventions are topv/args.h; the math
// is docs/algorithm.md. Kernel parameters carry per-segment tables by value (up to
// kMaxSegmentsPerLaunch segments per launch), which needs CUDA 12.1+ on sm_70+ (kernel parameters
// above 4 KiB).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "topv/args.h"

namespace topv {

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
