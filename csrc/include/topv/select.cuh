// Selection on the device, one block per segment (docs/algorithm.md, "Selection"):
// 1. radix-select (passes of 8 bits below the bits all keys share) the k_top-th largest score key;
//    NaN maps to the lowest key, so it ranks below every number, and equal keys are taken lowest
//    index first;
// 2. one ascending sweep over the indices marks the top set, ranks the rest, picks the uniform
//    recovery rest[((2j+1) L) // (2 k_rec)] and writes the kept indices in ascending order; the
//    positions follow from one block-wide prefix count per chunk (two barriers).
#pragma once

#include "topv/common.cuh"

namespace topv {
namespace detail {

struct SelSeg {
  long long score_off;   // scores of this segment start here
  long long index_base;  // added to the local index when writing (0 for local indices)
  long long out_off;     // first output slot
  int n, keep, k_rec;
};

struct SelTable {
  SelSeg seg[kMaxSegmentsPerLaunch];
};

// Order-preserving map of a float score to uint32: larger score -> larger key; NaN -> 0, below
// -inf; -0 and +0 are equal (both compare equal in the reference's sort).
__device__ __forceinline__ unsigned score_key(float v) {
  if (isnan(v)) return 0u;
  if (v == 0.0f) v = 0.0f;
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of `v` over the block (threads in index order); total in *total. The
// callers pack two counts into v (one per 16 bits), so one barrier pair serves both.
template <int NT>
__device__ __forceinline__ int block_excl_sum(int v, int* warp_tot, int* total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += u;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < NT / 32; ++w) {
    const int c = warp_tot[w];
    before += w < warp ? c : 0;
    all += c;
  }
  __syncthreads();  // warp_tot is reused by the next call
  *total = all;
  return before + incl - v;
}

// Recovery picks among the first `rho` rest positions: #{j < k_rec : ((2j+1) L) // (2 k_rec) < rho}
// = #{j : (2j+1) L < 2 k_rec rho} (floor(x) < rho <=> x < rho for integer rho).
__device__ __forceinline__ long long rec_before(long long rho, long long L, int k_rec) {
  const long long x = 2LL * k_rec * rho - L;
  return x <= 0 ? 0 : min((x + 2 * L - 1) / (2 * L), (long long)k_rec);
}

// Selection of one segment by the whole block (NT threads); sc points at the segment's n scores
// (global or shared memory). Also called by the cluster Sinkhorn kernel (sinkhorn_cluster.cuh).
template <int NT>
__device__ void select_block(const float* sc, const SelSeg& sg, int64_t* kept) {
  __shared__ int hist[2][256];  // double-buffered: a pass clears the next pass's histogram
  __shared__ int warp_tot[NT / 32];
  __shared__ unsigned s_digit;
  __shared__ int s_remaining, s_bin;
  const int n = sg.n, k_top = sg.keep - sg.k_rec;

  // 1. Radix select: the prefix P of the k_top-th largest key, and how many keys matching P
  //    (need_eq, lowest index first) belong to the top set. Digits of 8 bits start at the highest
  //    bit where the keys differ: a segment's scores share the sign and most of the exponent, and
  //    a digit that every key shares costs a pass of same-address atomics, which serialise. It
  //    stops early once every key matching P is wanted (then any key matching P is "equal").
  __shared__ unsigned red_min[NT / 32], red_max[NT / 32];
  unsigned kmin = ~0u, kmax = 0u;
  for (int i = threadIdx.x; i < n; i += NT) {
    const unsigned u = score_key(sc[i]);
    kmin = min(kmin, u);
    kmax = max(kmax, u);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    kmin = min(kmin, __shfl_xor_sync(0xffffffffu, kmin, o));
    kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
  }
  if ((threadIdx.x & 31) == 0) red_min[threadIdx.x >> 5] = kmin, red_max[threadIdx.x >> 5] = kmax;
  for (int b = threadIdx.x; b < 256; b += NT) hist[0][b] = 0;
  __syncthreads();
  for (int w = 0; w < NT / 32; ++w) kmin = min(kmin, red_min[w]), kmax = max(kmax, red_max[w]);
  int hi = (kmin ^ kmax) ? 31 - __clz(int(kmin ^ kmax)) : -1;  // highest differing bit
  unsigned mask = hi < 0 ? ~0u : ~((2u << hi) - 1u);           // 2u << 31 wraps to 0: mask 0
  unsigned prefix = kmin & mask;
  int remaining = k_top;  // rank (1-based) still to find among the keys matching prefix
  for (int p = 0; hi >= 0; hi -= 8, p ^= 1) {
    const int lo = max(hi - 7, 0);
    const unsigned dmask = (2u << (hi - lo)) - 1u;
    for (int i = threadIdx.x; i < n; i += NT) {
      const unsigned u = score_key(sc[i]);
      if ((u & mask) == prefix) atomicAdd(&hist[p][(u >> lo) & dmask], 1);
    }
    for (int b = threadIdx.x; b < 256; b += NT) hist[p ^ 1][b] = 0;
    __syncthreads();
    if (threadIdx.x < 32) {
      // Warp 0 finds the bin holding the wanted rank, scanning from the top: lane l owns bins
      // 255 - 8l down to 248 - 8l; an exclusive scan over lanes gives the count above each lane.
      // (Every warp scanning for itself, which saves the broadcast and a barrier, measured
      // slower: 16 warps contend for the same banks.)
      const int lane = threadIdx.x;
      int cnt[8], tot = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        cnt[q] = hist[p][255 - 8 * lane - q];
        tot += cnt[q];
      }
      int incl = tot;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      int above = incl - tot;
      if (above < remaining && remaining <= incl) {  // exactly one lane
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (above + cnt[q] >= remaining) {
            s_digit = unsigned(255 - 8 * lane - q);
            s_remaining = remaining - above;
            s_bin = cnt[q];
            break;
          }
          above += cnt[q];
        }
      }
    }
    __syncthreads();
    prefix |= s_digit << lo;
    mask |= dmask << lo;
    remaining = s_remaining;
    if (s_bin == remaining) break;  // block-uniform; s_* are rewritten only after the next barrier
  }
  const int need_eq = remaining;

  // 2. One ascending sweep in chunks of NT. Per index i: gt / eq = key above / matching the
  //    prefix; top = gt, or eq among the first need_eq eq's. Before i: top_b = gt_b + min(eq_b,
  //    need_eq) top picks, rest rank rho = i - top_b, and rec_before(rho) recovery picks, so
  //    the output slot and the recovery test need no further scan.
  const long long L = n - k_top;
  int run_gt = 0, run_eq = 0;
  for (int base = 0; base < n; base += NT) {
    const int i = base + threadIdx.x;
    const bool valid = i < n;
    const unsigned u = valid ? score_key(sc[i]) & mask : 0u;
    const bool gt = valid && u > prefix, eq = valid && u == prefix;
    int tot;
    const int packed = block_excl_sum<NT>(int(gt) | int(eq) << 16, warp_tot, &tot);
    const int gt_b = run_gt + (packed & 0xffff), eq_b = run_eq + (packed >> 16);
    run_gt += tot & 0xffff;
    run_eq += tot >> 16;
    if (!valid) continue;
    const int top_b = gt_b + min(eq_b, need_eq);
    const bool top = gt || (eq && eq_b < need_eq);
    const long long rho = i - top_b;
    const long long rec_b = sg.k_rec > 0 ? rec_before(rho, L, sg.k_rec) : 0;
    const bool rec = !top && sg.k_rec > 0 && rec_before(rho + 1, L, sg.k_rec) > rec_b;
    if (top || rec) kept[sg.out_off + top_b + rec_b] = sg.index_base + i;
  }
}

template <int NT>
__global__ __launch_bounds__(NT) void select_kernel(const float* scores, SelTable tab, int64_t* kept) {
  const SelSeg& sg = tab.seg[blockIdx.x];
  select_block<NT>(scores + sg.score_off, sg, kept);
}

}  // namespace detail
}  // namespace topv
