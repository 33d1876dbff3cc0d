// topv: framework-free C++ API of the TopV CPU kernels (no torch, no CUDA).
//
// The same operations and argument structures as the CUDA API (topv/topv.h, topv/args.h) on host
// pointers. A call runs to completion on the calling thread and the workers it spreads to.
// Threads and the float32 GEMM come from a Runtime: by default OpenMP (when the library was built
// with it, else one thread) and a built-in blocked GEMM; the torch extension passes ATen's thread
// pool and BLAS, which is what backend="cpp" runs. bfloat16 features on CPUs with AVX512-BF16 and
// without AMX go through the library's own bf16 GEMM either way (has_bf16_gemm()).
#pragma once

#include <cstdint>

#include "topv/args.h"

namespace topv {
namespace cpu {

struct Runtime {
  // Runs body(ctx, b0, b1) over [begin, end) in chunks of at least `grain` items, in parallel where
  // it helps; called from inside a body it runs inline.
  void (*parallel_for)(int64_t begin, int64_t end, int64_t grain, void (*body)(void* ctx, int64_t b0, int64_t b1),
                       void* ctx) = nullptr;
  int (*num_threads)() = nullptr;
  // out (n, m) = s (n, d) . t (m, d)^T in float32, row-major with row strides lds, ldt and m.
  void (*sgemm_nt)(int64_t n, int64_t m, int64_t d, const float* s, int64_t lds, const float* t, int64_t ldt,
                   float* out) = nullptr;
};

// Whether bfloat16 features take the library's own AVX512-BF16 GEMM on this CPU.
bool has_bf16_gemm();

// Each returns false (and writes nothing) when the arguments are invalid: the checks of topv.h's
// functions; feature pointers may be float32, float16 or bfloat16 (args.dtype).
// cost_matrix: out (batch, n, m) float32; *nonfinite (nullable) set to whether an input feature
// was not finite.
bool cost_matrix(const CostArgs& args, float* out, bool* nonfinite = nullptr, const Runtime& rt = {});
bool sinkhorn(const SinkhornArgs& args, float* f, float* g, const Runtime& rt = {});
// prune: kept (sum(keep),), scores (total_rows,), *nonfinite = 1 when a feature or position is not
// finite (0 otherwise; written only with check_finite). The cost of each segment is held whole.
bool prune(const PruneArgs& args, int64_t* kept, float* scores, int* nonfinite, const Runtime& rt = {});

}  // namespace cpu
}  // namespace topv
