// Device helpers shared by the topv kernels (framework-free: CUDA runtime headers only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "topv/topv.h"

namespace topv {
namespace detail {

constexpr float kCentre = 0.5f;
constexpr float kInvMaxCentreDist = 1.41421356237309515f;  // 1 / sqrt(0.5)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Zero of a feature type without the float conversions that torch builds disable
// (__CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__).
template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.0f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Online log-sum-exp state (max, sum of exp(x - max)). An empty state is (-inf, 0); merging
// with it must not evaluate exp(-inf - -inf).
struct Lse {
  float mx, s;
};

__device__ __forceinline__ Lse lse_empty() { return {-INFINITY, 0.0f}; }

__device__ __forceinline__ void lse_add(Lse& a, float x) {
  if (x > a.mx) {
    a.s = a.s * __expf(a.mx - x) + 1.0f;
    a.mx = x;
  } else {
    a.s += __expf(x - a.mx);
  }
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  if (b.mx == -INFINITY) return a;
  if (a.mx == -INFINITY) return b;
  const float m = fmaxf(a.mx, b.mx);
  return {m, a.s * __expf(a.mx - m) + b.s * __expf(b.mx - m)};
}

__device__ __forceinline__ Lse warp_lse(Lse v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Lse w{__shfl_xor_sync(0xffffffffu, v.mx, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = lse_merge(v, w);
  }
  return v;
}

__device__ __forceinline__ float lse_value(Lse a) { return a.mx + __logf(a.s); }

template <DType D>
struct TypeOf;
template <>
struct TypeOf<DType::kFloat32> {
  using type = float;
};
template <>
struct TypeOf<DType::kFloat16> {
  using type = __half;
};
template <>
struct TypeOf<DType::kBFloat16> {
  using type = __nv_bfloat16;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// mbarrier and bulk copies (sm_90; CTA-local barriers). bar / dst: shared-memory addresses.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spins until the phase of parity `parity` has completed (parity 1 on a fresh barrier: at once).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nTOPV_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra TOPV_MBAR_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Makes mbarrier.init visible to the async proxy (TMA) before a copy completes on the barrier.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// `bytes` (a multiple of 16; 16-byte-aligned ends) from global src to shared dst, completing on bar.
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
               : "memory");
}
#endif

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Carves a workspace into 256-byte aligned pieces; with base == nullptr it only measures.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    used = align_up(used, 256);
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += count * sizeof(T);
    return p;
  }
};

}  // namespace detail
}  // namespace topv
