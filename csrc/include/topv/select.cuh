// Selection on the device, one block per segment (docs/algorithm.md, "Selection"):
// 1. radix-select (4 passes of 8 bits) the k_top-th largest score key; NaN maps to the lowest key,
//    so it ranks below every number, and equal keys are taken lowest index first;
// 2. one ascending sweep over the indices marks the top set, ranks the rest, picks the uniform
//    recovery rest[((2j+1) L) // (2 k_rec)] and writes the kept indices in ascending order.
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

// Exclusive prefix count of `flag` over the block (threads in index order); total in *total.
template <int NT>
__device__ __forceinline__ int block_excl_count(bool flag, int* warp_tot, int* total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned ball = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ball & ((1u << lane) - 1u));
  if (lane == 0) warp_tot[warp] = __popc(ball);
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < NT / 32; ++w) {
    const int c = warp_tot[w];
    before += w < warp ? c : 0;
    all += c;
  }
  __syncthreads();  // warp_tot is reused by the next call
  *total = all;
  return before + in_warp;
}

// Selection of one segment by the whole block (NT threads); sc points at the segment's n scores
// (global or shared memory). Also called by the cluster Sinkhorn kernel (sinkhorn_cluster.cuh).
template <int NT>
__device__ void select_block(const float* sc, const SelSeg& sg, int64_t* kept) {
  __shared__ int hist[256];
  __shared__ int warp_tot[NT / 32];
  __shared__ unsigned s_digit;
  __shared__ int s_remaining;
  const int n = sg.n, k_top = sg.keep - sg.k_rec;

  // 1. Radix select: the key K of the k_top-th largest element and how many elements equal to K
  //    belong to the top set (need_eq).
  unsigned prefix = 0, mask = 0;
  int remaining = k_top;  // rank (1-based) still to find among the elements matching prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += NT) hist[b] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += NT) {
      const unsigned u = score_key(sc[i]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Warp 0 finds the bin holding the wanted rank, scanning from the top: lane l owns bins
      // 255 - 8l down to 248 - 8l; an exclusive scan over lanes gives the count above each lane.
      const int lane = threadIdx.x;
      int cnt[8], tot = 0;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        cnt[q] = hist[255 - 8 * lane - q];
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
            break;
          }
          above += cnt[q];
        }
      }
    }
    __syncthreads();
    prefix |= s_digit << shift;
    mask |= 255u << shift;
    remaining = s_remaining;
    __syncthreads();
  }
  const unsigned K = prefix;
  const int need_eq = remaining;

  // 2. Ascending sweep.
  const long long L = n - k_top;
  int run_eq = 0, run_rest = 0, run_out = 0;
  for (int base = 0; base < n; base += NT) {
    const int i = base + threadIdx.x;
    const bool valid = i < n;
    const unsigned u = valid ? score_key(sc[i]) : 0u;
    int tot;
    const bool is_eq = valid && u == K;
    const int eq_rank = run_eq + block_excl_count<NT>(is_eq, warp_tot, &tot);
    run_eq += tot;
    const bool top = valid && (u > K || (is_eq && eq_rank < need_eq));
    const bool rest = valid && !top;
    const int rest_rank = run_rest + block_excl_count<NT>(rest, warp_tot, &tot);
    run_rest += tot;
    bool rec = false;
    if (rest && sg.k_rec > 0) {
      // rest position of recovery j is ((2j+1) L) // (2 k_rec) ~ (j + 1/2) L / k_rec, so the j
      // that could land on rest_rank is floor(rest_rank k_rec / L) or a neighbour.
      const long long c = (long long)rest_rank * sg.k_rec / L;
      for (long long jj = c - 1; jj <= c + 1; ++jj)
        if (jj >= 0 && jj < sg.k_rec && ((2 * jj + 1) * L) / (2LL * sg.k_rec) == rest_rank) rec = true;
    }
    const bool keep = top || rec;
    const int slot = run_out + block_excl_count<NT>(keep, warp_tot, &tot);
    run_out += tot;
    if (keep) kept[sg.out_off + slot] = sg.index_base + i;
  }
}


template <int NT>
__global__ __launch_bounds__(NT) void select_kernel(const float* scores, SelTable tab, int64_t* kept) {
  const SelSeg& sg = tab.seg[blockIdx.x];
  select_block<NT>(scores + sg.score_off, sg, kept);
}

}  // namespace detail
}  // namespace topv
