// The cost GEMM's launcher: which kernel (mma.sync in cost.cuh, wgmma in cost_wgmma.cuh), which
// tile config and how many K splits, from a wave / load model fitted to H100 timings.
#pragma once

#include <algorithm>

#include "topv/cost.cuh"
#include "topv/cost_wgmma.cuh"

namespace topv {
namespace detail {

// Wave / efficiency model, in SM clocks of the busiest SM. eff: fraction of the dense 16-bit
// peak (4096 FLOP / clk / SM on H100) a config reaches when the SM is full. mma.sync values are
// fitted to H100 timings of csrc/tests/gemm_check.cu (B = 16 / 64 n = 576 d = 4096, 3072 x 16384
// d = 3584): 128 x 256 ~0.35, 128 x 128 ~0.30, 64 x 64 ~0.25, 128 x 192 ~0.245 (its 6 warps leave
// the SM short of warps). ld: bytes per SM clock at which one block's tile loads stream (0: not
// modelled). The wgmma kernel's blocks load ~21 B / clk in every H100 timing of gemm_check
// (B = 1 to 64 at n = 576, n = 2880, 3072 x 16384; whether 9 SMs are busy or all 132; 21 x 132 x
// 1.98 GHz is also the ~5.5 TB/s the L2 delivers), and their MMAs would take less time: a block
// takes time in proportion to bm + bn for bm bn of work, hence 192 x 192. Their eff values are
// estimates that no timing has tested. mma.sync: shared-memory traffic binds first, and their eff
// values were fitted without a load term.
struct TcModel {
  int bm, bn, occ;  // occ: blocks per SM the config is sized for
  double eff, ld;
};
// Model indices: [0, kTcConfigs) mma.sync (TcWide, TcMid, TcSq, TcSmall), then kWgConfigs wgmma
// (WgWide, WgMid, WgSq, WgBigSq).
constexpr int kTcConfigs = 4, kWgConfigs = 4;
inline TcModel tc_model(int i) {
  constexpr double kWgLd = 21.0;
  constexpr TcModel m[kTcConfigs + kWgConfigs] = {{TcWide::BM, TcWide::BN, TcWide::MINB, 0.35, 0.0},
                                                  {TcMid::BM, TcMid::BN, TcMid::MINB, 0.245, 0.0},
                                                  {TcSq::BM, TcSq::BN, TcSq::MINB, 0.30, 0.0},
                                                  {TcSmall::BM, TcSmall::BN, TcSmall::MINB, 0.25, 0.0},
                                                  {WgWide::BM, WgWide::BN, WgWide::MINB, 0.80, kWgLd},
                                                  {WgMid::BM, WgMid::BN, WgMid::MINB, 0.77, kWgLd},
                                                  {WgSq::BM, WgSq::BN, WgSq::MINB, 0.70, kWgLd},
                                                  {WgBigSq::BM, WgBigSq::BN, WgBigSq::MINB, 0.80, kWgLd}};
  return m[i];
}

inline double tc_model_cost(const TcModel& m, int cnt, int rows, int cols, long long d, int sm_count, int splits,
                            bool partial) {
  const long long tiles = (long long)((rows + m.bm - 1) / m.bm) * ((cols + m.bn - 1) / m.bn) * cnt;
  const long long ktiles = d > 0 ? (d + 63) / 64 : 1;
  const long long per = (ktiles + splits - 1) / splits;
  const long long blocks = tiles * splits, sms = sm_count > 0 ? sm_count : 1;
  const double mma = double(m.bm) * m.bn * double(per * 64) * 2.0 / (4096.0 * m.eff);
  const double load = m.ld > 0.0 ? double(m.bm + m.bn) * double(per * 64) * 2.0 / m.ld : 0.0;
  // Epilogue: partial tiles are plain fp32 stores (~48 B / clk / SM); the cost formula is ~20
  // instructions per element at 128 lanes / clk. Pipeline fill ~1500 clk, overlapped by
  // co-resident blocks.
  const double epi = double(m.bm) * m.bn * (partial ? 4.0 / 48.0 : 20.0 / 128.0);
  const double fill = 1500.0 / m.occ;
  double t = double((blocks + sms - 1) / sms) * (std::max(mma, load) + epi + fill);
  // Each extra split is another rows x cols fp32 partial written here and read by the consumer,
  // 8 B an element at ~8 B / clk / SM (~2 TB/s, memory speed; H100: +10 us a split at B = 16,
  // n = 576).
  if (partial) t += double(splits - 1) * cnt * double(rows) * cols * 8.0 / (8.0 * sms);
  return t;
}

// The model index of the cheapest config of one family (wg: the wgmma configs, else mma.sync).
inline int tc_pick_config(int cnt, int rows, int cols, long long d, int sm_count, int splits, bool partial, bool wg) {
  const int lo = wg ? kTcConfigs : 0, hi = wg ? kTcConfigs + kWgConfigs : kTcConfigs;
  int best = lo;
  double bt = 0.0;
  for (int i = lo; i < hi; ++i) {
    const double t = tc_model_cost(tc_model(i), cnt, rows, cols, d, sm_count, splits, partial);
    if (i == lo || t < bt) best = i, bt = t;
  }
  return best;
}

// Split count the launcher would like for this problem in PARTIAL mode (fills ~1-2 waves on
// sm_count SMs for small problems such as B = 1, n = 576, d = 4096; returns 1 when the tiles
// alone fill the GPU). Modelled for the kernel family the current device gets with aligned
// (VEC) inputs: wgmma where wg_available(), else mma.sync.
inline int cost_gemm_tc_splits(int cnt, int max_rows, int max_cols, long long d, int sm_count) {
  if (cnt <= 0 || max_rows <= 0 || max_cols <= 0) return 1;
  const bool wg = wg_available();
  const long long ktiles = d > 0 ? (d + 63) / 64 : 1;
  // >= 4 k tiles a split (else the pipeline never fills); grid z <= 65535.
  const long long cap = std::min<long long>(std::min<long long>(32, std::max<long long>(1, ktiles / 4)),
                                            65535 / cnt);
  int best = 1;
  double bt = 0.0;
  for (int s = 1; s <= cap; ++s) {
    const int i = tc_pick_config(cnt, max_rows, max_cols, d, sm_count, s, true, wg);
    const double t = tc_model_cost(tc_model(i), cnt, max_rows, max_cols, d, sm_count, s, true);
    if (s == 1 || t < 0.97 * bt) best = s, bt = t;  // a split must buy > 3%
  }
  return best;
}

// Launches the 16-bit tensor-core GEMM over `cnt` segments (tab.seg[0..cnt)), grid sized from the
// largest rows/cols; with PARTIAL the split count is a.splits (>= 1). Picks the kernel (wgmma for
// inputs its tensor maps take (wg_tma_ok) where wg_available(), else mma.sync) and its tile config.
// Launches tile config `cfg`: 0-3 mma.sync (TcWide, TcMid, TcSq, TcSmall), 4-7 wgmma (WgWide,
// WgMid, WgSq, WgBigSq; sm_90a builds only, and only for inputs wg_tma_ok accepts).
template <typename T, bool PARTIAL>
inline cudaError_t launch_cost_gemm_config(int cfg, const GemmArgs& a, const GemmTable& tab, int cnt, int max_rows,
                                           int max_cols, bool vec, cudaStream_t st) {
  switch (cfg) {
    case 0: return launch_cost_gemm_tc_cfg<T, TcWide, PARTIAL>(a, tab, cnt, max_rows, max_cols, vec, st);
    case 1: return launch_cost_gemm_tc_cfg<T, TcMid, PARTIAL>(a, tab, cnt, max_rows, max_cols, vec, st);
    case 2: return launch_cost_gemm_tc_cfg<T, TcSq, PARTIAL>(a, tab, cnt, max_rows, max_cols, vec, st);
    case 3: return launch_cost_gemm_tc_cfg<T, TcSmall, PARTIAL>(a, tab, cnt, max_rows, max_cols, vec, st);
#if defined(TOPV_HAS_SM90A) && TOPV_HAS_SM90A
    case 4: return launch_cost_gemm_wg_cfg<T, WgWide, PARTIAL>(a, tab, cnt, max_rows, max_cols, st);
    case 5: return launch_cost_gemm_wg_cfg<T, WgMid, PARTIAL>(a, tab, cnt, max_rows, max_cols, st);
    case 6: return launch_cost_gemm_wg_cfg<T, WgSq, PARTIAL>(a, tab, cnt, max_rows, max_cols, st);
    case 7: return launch_cost_gemm_wg_cfg<T, WgBigSq, PARTIAL>(a, tab, cnt, max_rows, max_cols, st);
#endif
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, bool PARTIAL>
inline cudaError_t launch_cost_gemm_tc(const GemmArgs& a, const GemmTable& tab, int cnt, int max_rows, int max_cols,
                                       bool vec, int sm_count, cudaStream_t st) {
  if (cnt <= 0 || max_rows <= 0 || max_cols <= 0) return cudaSuccess;
  if (cnt > kMaxSegmentsPerLaunch) return cudaErrorInvalidValue;
  const int splits = PARTIAL ? std::max(a.splits, 1) : 1;
  const bool wg = vec && wg_available() && wg_tma_ok(a, tab, cnt);
  return launch_cost_gemm_config<T, PARTIAL>(tc_pick_config(cnt, max_rows, max_cols, a.d, sm_count, splits, PARTIAL, wg),
                                             a, tab, cnt, max_rows, max_cols, vec, st);
}

}  // namespace detail
}  // namespace topv
