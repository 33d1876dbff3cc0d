// Cost GEMM on Hopper's warpgroup MMA (wgmma, sm_90a) with TMA loads: same contract as
// cost_gemm_tc_kernel (cost.cuh) for inputs the tensor maps can describe (wg_tma_ok: 16-byte-aligned
// bases, row strides >= d and a multiple of 16 bytes, segment offsets whole rows), which the
// launcher (cost_launch.cuh) picks on compute capability 9.0 when the build has sm_90a code
// (TOPV_HAS_SM90A).
// Everything else goes to the mma.sync kernel.
//
// * Block tile BM x BN (BM = 64 NCW with NCW = 2 or 3 consumer warpgroups; BN = 128 / 192 / 256),
//   BK = 64, 128 (NCW + 1) threads: warps 0 .. 4 NCW - 1 are the consumer warpgroups (warpgroup g
//   computes rows 64g..64g+63 against all BN columns with wgmma m64nBNk16, both operands from
//   shared memory, fp32 accumulators in registers, BN / 2 per thread); the last 4 warps are the
//   producer warpgroup, which hands its registers to the consumers (setmaxnreg, see WgCfg) and of
//   which one lane issues the TMA copies.
// * Loads: one 2D tensor map per operand (S: rows x d, T: cols x d, box 64 x BM / 64 x BN,
//   128-byte swizzle, zero fill out of bounds), encoded on the host for every launch. A segment's
//   first row is its row coordinate (s_off / lds); a tile's rows past the segment read the next
//   segment's rows (never stored, their norms never written), rows past the tensor and k past d
//   read zeros. The swizzled box is exactly the K-major 128-byte-swizzle layout wgmma reads
//   (1024-byte-aligned stage bases, 8-row atoms of 1024 B: every warpgroup's 64 A rows and the B
//   rows after the BM A rows start on an atom).
// * Pipeline: STAGES stages, each with a full barrier (1 arrival + the transaction bytes of both
//   boxes) and an empty barrier (one arrival per consumer warp). The producer waits a stage's
//   empty barrier, arms its full barrier with the stage's bytes and issues the two copies. The
//   consumers wait the full barrier, issue the 4 k16 wgmmas as one group, square the stage's rows
//   for the norms while it runs, wait until at most this group is in flight and then release the
//   previous stage (its group has finished reading it, and so have this warp's squares). No
//   block-wide barrier in the main loop.
// * Row norms: consumer thread t of warpgroup g squares 16-byte chunk t & 7 (in stored, swizzled
//   order: only the row matters) of its own A rows 64g + (t >> 3) + 16i and of B rows
//   BN/NCW g + (t >> 3) + 16i (the shared B rows split evenly, so every warp squares as much
//   between its wgmma issue and wait); 8 lanes share a row, a shuffle reduction at the end. In
//   PARTIAL mode only the blocks that write sums of squares (tile column 0 for rows, tile row 0
//   for columns) square.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <climits>
#include <type_traits>

#include "topv/cost.cuh"

namespace topv {
namespace detail {

// ---------------------------------------------------------------------------------------------
// The wgmma GEMM configs (sm_90a only). Block tile BM x BN with
// BM = 64 NCW, BK = 64: NCW consumer warpgroups (64 rows each) + 1 TMA producer warpgroup,
// 128 (NCW + 1) threads, 1 block per SM. Registers: the launch bounds give every thread 65536 / NT
// (in steps of 8): 168 at NCW = 2, 128 at NCW = 3. The consumers need more (BN / 2 accumulators),
// so the producer warpgroup drops to PREGS with setmaxnreg and the consumers take what it frees:
// 128 * 40 + 256 * 232 = 384 * 168, 128 * 32 + 384 * 160 = 512 * 128. (A lone producer warp
// would not save that: each SM sub-partition holds a quarter of the register file and every
// fourth warp, so ptxas caps 13 warps at 128 registers like 16, and 9 at 168 like 12.)
// SMEM: the stages, + 1024 (the kernel aligns its base to the swizzle atom), + the full / empty
// mbarrier pairs.
// * WgWide 128 x 256, 4 x 48 KB stages: the most reuse per loaded byte with 2 warpgroups; big
//   problems ((c): 3072 x 16384, d = 3584).
// * WgMid 128 x 192, 5 x 40 KB: n = 576 = 3 x 192 columns.
// * WgSq 128 x 128, 6 x 32 KB: finer wave granularity (at 2 blocks per SM the launch bounds
//   would leave 80 registers, too few for the accumulators).
// * WgBigSq 192 x 192 (3 consumer warpgroups), 4 x 48 KB (5 would not fit): big batches of
//   n = 576 segments and big segments. The kernel is bound by its tile loads, not its MMAs (ncu
//   at 64 x 576^2, d = 4096, 128 x 192: L2 85 %, SM 47 %; see tc_model): a 576 x 576 segment is
//   15 tiles of 128 x 192 reading 15 x 320 tile rows of d, with 576 rows padded to 640, against 9
//   tiles of 192 x 192 reading 9 x 384 (-28 %) with no padding (also exact at n = 2880 = 15 x 192).
//   H100 (gemm_check): 64 x 576^2 412 us against 458 for 128 x 192, n = 2880 166 against 199; but
//   B = 16 (144 tiles for 132 SMs) 158 against 121, so the model chooses. 192 x 256 would need 128
//   accumulators of the consumers' 160 registers.
// ---------------------------------------------------------------------------------------------

template <int BN_, int STAGES_, int NCW_>
struct WgCfg {
  static constexpr int NCW = NCW_;  // consumer warpgroups
  static constexpr int BM = 64 * NCW, BN = BN_, BK = 64, STAGES = STAGES_, MINB = 1;
  static constexpr int NCT = 128 * NCW, NT = NCT + 128;  // consumer threads; + the producer warpgroup
  static constexpr int PREGS = NCW == 2 ? 40 : 32;       // setmaxnreg targets: producer, consumers
  static constexpr int CREGS = NCW == 2 ? 232 : 160;
  static constexpr int STAGE_BYTES = (BM + BN) * BK * 2;
  static constexpr size_t SMEM = size_t(STAGES) * STAGE_BYTES + 1024 + size_t(2 * STAGES) * 8;
};
using WgWide = WgCfg<256, 4, 2>;
using WgMid = WgCfg<192, 5, 2>;
using WgSq = WgCfg<128, 6, 2>;
using WgBigSq = WgCfg<192, 4, 3>;

// Whether launches on the current device may use the wgmma kernel: the build has sm_90a code
// (TOPV_HAS_SM90A) and the device is compute capability 9.0, the only one sm_90a code runs on.
inline bool wg_available() {
#if defined(TOPV_HAS_SM90A) && TOPV_HAS_SM90A
  static signed char known[64] = {};  // per device: 0 not asked yet, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev < 64 && known[dev]) return known[dev] > 0;
  int major = 0, minor = 0;
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                  major == 9 && minor == 0;
  if (dev < 64) known[dev] = ok ? 1 : -1;
  return ok;
#else
  return false;
#endif
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor: start address >> 4, leading byte offset 16 (unused by swizzled
// K-major layouts), stride byte offset 1024 (next 8-row atom), 128-byte swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
  return uint64_t((saddr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The wgmma asm claims to write the accumulators when it is issued; they are only final after
// wg_wait. This empty asm "rewrites" them at a point the compiler cannot move accesses across.
template <int R>
__device__ __forceinline__ void wg_fence_acc(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// TMA (the mbarrier helpers are in common.cuh).
// Box at (c0 = k element, c1 = row) of `map` into shared memory at dst, completing on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Named barrier 1 over the NCT consumer threads (the producer warpgroup has left by then).
template <int NCT>
__device__ __forceinline__ void consumer_sync() {
  static_assert(NCT % 32 == 0, "bar.sync counts whole warps");
  asm volatile("bar.sync 1, %0;\n" ::"n"(NCT) : "memory");
}

// d += A (64 x 16, descriptor da) * B (N x 16, descriptor db)^T. scale-d = 1 (d starts at zero).
#define TOPV_WGMMA_128(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"  \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "l"(da), "l"(db), "n"(1))

#define TOPV_WGMMA_192(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"  \
               "wgmma.mma_async.sync.aligned.m64n192k16.f32." TY "." TY " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
               "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95" \
               "}, %96, %97, p, 1, 1, 0, 0;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]) \
               : "l"(da), "l"(db), "n"(1))

#define TOPV_WGMMA_256(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"  \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
               "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
               "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
               "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
               "}, %128, %129, p, 1, 1, 0, 0;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
                 "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
                 "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
                 "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
                 "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
               : "l"(da), "l"(db), "n"(1))

template <typename T, int N>
__device__ __forceinline__ void wgmma_k16(float (&d)[N / 2], uint64_t da, uint64_t db) {
  static_assert(N == 128 || N == 192 || N == 256, "wrapped shapes");
  constexpr bool bf = std::is_same<T, __nv_bfloat16>::value;
  if constexpr (N == 128) {
    if constexpr (bf) TOPV_WGMMA_128("bf16"); else TOPV_WGMMA_128("f16");
  } else if constexpr (N == 192) {
    if constexpr (bf) TOPV_WGMMA_192("bf16"); else TOPV_WGMMA_192("f16");
  } else {
    if constexpr (bf) TOPV_WGMMA_256("bf16"); else TOPV_WGMMA_256("f16");
  }
}

#undef TOPV_WGMMA_128
#undef TOPV_WGMMA_192
#undef TOPV_WGMMA_256

#endif  // sm_90a device code

// Grid and PARTIAL semantics as cost_gemm_tc_kernel. Configs: WgCfg in cost.cuh. tm_s / tm_t: the
// tensor maps of S and T (wg_encode_maps).
template <typename T, class Cfg, bool PARTIAL>
__global__ __launch_bounds__(Cfg::NT, Cfg::MINB) void cost_gemm_wg_kernel(GemmArgs a, GemmTable tab,
                                                                          const __grid_constant__ CUtensorMap tm_s,
                                                                          const __grid_constant__ CUtensorMap tm_t) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NCW = Cfg::NCW, BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES, NCT = Cfg::NCT;
  constexpr int ROWB = BK * 2;  // bytes per tile row
  constexpr int NACC = BN / 2;
  constexpr int BW = BN / NCW;                 // B rows a warpgroup squares
  constexpr int SQA = 64 / 16, SQB = BW / 16;  // rows a consumer thread squares per stage: A, B
  static_assert(sizeof(T) == 2 && BK == 64, "16-bit inputs, 128-byte tile rows (one swizzle span)");
  static_assert((NCW == 2 || NCW == 3) && BM == 64 * NCW && NCT == 128 * NCW && Cfg::NT == NCT + 128,
                "NCW m64 consumer warpgroups + a producer warpgroup");
  // setmaxnreg: what the producer warpgroup gives back covers what the consumers take, within the
  // registers the launch bounds give every thread (65536 / NT, in steps of 8).
  constexpr int LREGS = 65536 / (Cfg::NT * Cfg::MINB) / 8 * 8;
  static_assert(Cfg::PREGS % 8 == 0 && Cfg::CREGS % 8 == 0 && Cfg::PREGS >= 24 && Cfg::CREGS <= 256 &&
                    Cfg::PREGS <= LREGS && (Cfg::CREGS - LREGS) * NCT <= (LREGS - Cfg::PREGS) * 128,
                "setmaxnreg budget");
  static_assert(BM <= 256 && BN <= 256, "TMA box rows");
  static_assert(Cfg::SMEM <= 227 * 1024, "dynamic shared memory");
  static_assert(Cfg::STAGE_BYTES % 1024 == 0 && (64 * ROWB) % 1024 == 0,
                "1024-byte-aligned stage, warpgroup A and B bases (B starts after BM = 64 NCW rows)");
  static_assert(BN % (16 * NCW) == 0 && STAGES >= 2, "whole norm passes; pipeline");
  static_assert((BM + BN) * 4 <= Cfg::STAGE_BYTES * STAGES, "norm scratch fits in the stages");
  extern __shared__ unsigned char smem_raw[];
  // Swizzle atoms are 1024 B, and the swizzle is a function of the address: align the base.
  const uint32_t raw_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem_base = (raw_base + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (smem_base - raw_base);
  // Barriers after the stages: full[s] at bar0 + 8 s, empty[s] at bar0 + 8 (STAGES + s).
  const uint32_t bar0 = smem_base + uint32_t(STAGES * Cfg::STAGE_BYTES);
  auto full_bar = [&](int s) { return bar0 + 8u * uint32_t(s); };
  auto empty_bar = [&](int s) { return bar0 + 8u * uint32_t(STAGES + s); };

  launch_dependents();
  const auto [seg, split, tm, tn, kt0, nk] = gemm_tile(PARTIAL ? a.splits : 1, int((a.d + BK - 1) / BK));
  const GemmSeg& sg = tab.seg[seg];
  const int row0 = tm * BM, col0 = tn * BN;
  if (row0 >= sg.rows || col0 >= sg.cols) return;
  if (a.done && a.done[sg.id]) return;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  __shared__ int tile_exact;  // a row or column of the tile takes the exact path (cost.cuh)
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_bar(s), 1u);                   // the producer's arrive.expect_tx (+ the bytes)
      mbar_init(empty_bar(s), uint32_t(NCT / 32));  // one arrival per consumer warp
    }
    mbar_init_fence();
    tile_exact = 0;
  }
  __syncthreads();  // the last block-wide barrier: the producer warpgroup leaves after its loop

  // ---- producer warpgroup (the last 4 warps): gives registers to the consumers; its first warp's
  // lane 0 issues the copies, the rest leave.
  if (warp >= NCT / 32) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Cfg::PREGS));
    if (warp == NCT / 32 && lane == 0 && nk > 0) {
      tma_prefetch_map(&tm_s);
      tma_prefetch_map(&tm_t);
      // Row coordinates of the tile's first A / B rows (wg_tma_ok: offsets are whole rows).
      const int ra = int(sg.s_off / a.lds) + row0, rbt = int(sg.t_off / a.ldt) + col0;
      int st = 0;
      uint32_t ph = 0;
      for (int kt = 0; kt < nk; ++kt) {
        mbar_wait(empty_bar(st), ph ^ 1u);  // round 0: passes at once
        mbar_arrive_expect_tx(full_bar(st), uint32_t(Cfg::STAGE_BYTES));
        const uint32_t dst = smem_base + uint32_t(st * Cfg::STAGE_BYTES);
        const int k = (kt0 + kt) * BK;
        tma_load_2d(dst, &tm_s, k, ra, full_bar(st));
        tma_load_2d(dst + uint32_t(BM * ROWB), &tm_t, k, rbt, full_bar(st));
        if (++st == STAGES) st = 0, ph ^= 1u;
      }
    }
    return;
  }

  // ---- consumers: warpgroup wg = warps 4 wg .. 4 wg + 3; ct = thread within the warpgroup.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Cfg::CREGS));
  const int wg = warp >> 2, ct = tid & 127;
  // Which norms this block produces (block-uniform).
  const bool need_a = !PARTIAL || tn == 0, need_b = !PARTIAL || tm == 0;
  // Descriptors: warpgroup wg's 64 A rows, all BN B rows; + 2 per k16 step (32 B inside the
  // 128-byte swizzle atom), + STAGE_BYTES / 16 per stage.
  const uint64_t da0 = wg_desc(smem_base + uint32_t(wg * 64 * ROWB));
  const uint64_t db0 = wg_desc(smem_base + uint32_t(BM * ROWB));
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;

  // Norm rows of this thread: A rows 64 wg + (ct >> 3) + 16 i, B rows BW wg + (ct >> 3) + 16 i,
  // stored chunk ct & 7 of each (a warp reads 4 whole rows: conflict-free).
  const uint32_t sq_a = uint32_t((wg * 64 + (ct >> 3)) * ROWB + (ct & 7) * 16);
  const uint32_t sq_b = uint32_t((BM + wg * BW + (ct >> 3)) * ROWB + (ct & 7) * 16);
  float ss[SQA + SQB];
#pragma unroll
  for (int i = 0; i < SQA + SQB; ++i) ss[i] = 0.0f;
  auto square_stage = [&](int stage) {
    const unsigned char* src = smem + stage * Cfg::STAGE_BYTES;
    if (need_a) {
#pragma unroll
      for (int i = 0; i < SQA; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + sq_a + i * 16 * ROWB);
        ss[i] = sumsq2<T>(v.w, sumsq2<T>(v.z, sumsq2<T>(v.y, sumsq2<T>(v.x, ss[i]))));
      }
    }
    if (need_b) {
#pragma unroll
      for (int i = 0; i < SQB; ++i) {
        const uint4 v = *reinterpret_cast<const uint4*>(src + sq_b + i * 16 * ROWB);
        ss[SQA + i] = sumsq2<T>(v.w, sumsq2<T>(v.z, sumsq2<T>(v.y, sumsq2<T>(v.x, ss[SQA + i]))));
      }
    }
  };

  int st = 0, prev = 0;
  uint32_t ph = 0;
  for (int kt = 0; kt < nk; ++kt) {
    mbar_wait(full_bar(st), ph);  // both boxes of tile kt have landed
    const uint64_t so = uint64_t(st * (Cfg::STAGE_BYTES >> 4));
    wg_fence();
    wg_fence_acc(acc);
#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) wgmma_k16<T, BN>(acc, da0 + so + 2 * ks, db0 + so + 2 * ks);
    wg_commit();
    square_stage(st);
    wg_wait<1>();  // tile kt - 1's group is done (this warpgroup's)
    wg_fence_acc(acc);
    if (kt > 0) {  // release tile kt - 1's stage: this warp's wgmma reads and squares are done
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar(prev));
    }
    prev = st;
    if (++st == STAGES) st = 0, ph ^= 1u;
  }
  wg_wait<0>();
  wg_fence_acc(acc);
  consumer_sync<NCT>();  // no wgmma, copy or square touches the stages any more: scratch

  // ---- norms: the 8 lanes of a row hold different k; lane (ct & 7) == 0 stores the row's sum.
  float* nrm = reinterpret_cast<float*>(smem);  // [BM + BN]
#pragma unroll
  for (int i = 0; i < SQA + SQB; ++i) {
    float v = ss[i];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    if ((ct & 7) == 0)
      nrm[i < SQA ? wg * 64 + (ct >> 3) + 16 * i : BM + wg * BW + (ct >> 3) + 16 * (i - SQA)] = v;
  }
  consumer_sync<NCT>();
  for (int i = tid; i < BM + BN; i += NCT) {
    const float s = nrm[i];
    if constexpr (PARTIAL) {  // rows / columns past the segment (other segments' data) are not stored
      if (i < BM) {
        if (tn == 0 && row0 + i < sg.rows) a.sq_s[split * a.sq_stride + sg.sq_off + row0 + i] = s;
      } else {
        if (tm == 0 && col0 + i - BM < sg.cols) a.sq_t[split * a.sq_stride + sg.sq_off + col0 + i - BM] = s;
      }
    } else {
      nrm[i] = tile_inv_norm(s, i < BM ? row0 + i < sg.rows : col0 + i - BM < sg.cols);
      if (isinf(nrm[i])) tile_exact = 1;
    }
  }

  // ---- epilogue from the accumulators: warp w of warpgroup wg holds rows 64 wg + 16 (w & 3) + g
  // (regs 4j, 4j + 1: cols 8j + 2 t4 + {0, 1}) and + 8 (regs 4j + 2, 4j + 3).
  const int g = lane >> 2, t4 = lane & 3;
  const int rb = wg * 64 + (warp & 3) * 16 + g, cbase = 2 * t4;
  auto store = [&](float* C, int j0, int j1) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + rb + h * 8;
      if (r >= sg.rows) continue;
      float* Cr = C + int64_t(r) * sg.cols;
#pragma unroll
      for (int j = j0; j < j1; ++j) {
        const int c = col0 + cbase + j * 8;
        if (c < sg.cols) Cr[c] = acc[4 * j + 2 * h];
        if (c + 1 < sg.cols) Cr[c + 1] = acc[4 * j + 2 * h + 1];
      }
    }
  };
  if constexpr (PARTIAL) {
    store(a.C + split * a.part_stride + sg.c_off, 0, BN / 8);
  } else {
    consumer_sync<NCT>();  // inverse norms complete
    // Chunks of JC column groups: cost values first, stores after (with no store in between the
    // compiler shares the position loads, see cost_gemm_tc_kernel), but not for the whole tile at
    // once, which would hold every column's positions next to all accumulators and spill.
    // Clamped indices off the edge, not stored.
    constexpr int JC = 4;
    static_assert((BN / 8) % JC == 0, "whole chunks");
#pragma unroll
    for (int j0 = 0; j0 < BN / 8; j0 += JC) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = rb + h * 8;
        const int r = min(row0 + lr, sg.rows - 1);
        const float inv_r = nrm[lr];
#pragma unroll
        for (int j = j0; j < j0 + JC; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int lc = cbase + j * 8 + e;
            const int c = min(col0 + lc, sg.cols - 1);
            acc[4 * j + 2 * h + e] = cost_value(a, sg, r, c, acc[4 * j + 2 * h + e], inv_r * nrm[BM + lc]);
          }
      }
      store(a.C + sg.c_off, j0, j0 + JC);
    }
    if (tile_exact) {  // read after the barrier that completed the inverse norms: uniform
      consumer_sync<NCT>();  // the tile's stores precede the rewrites
      store_exact_tile(a, sg, row0, col0, BM, BN, nrm, nrm + BM, tid, NCT);
    }
    if (a.ready) {
      consumer_sync<NCT>();  // every store of the tile precedes the release
      if (tid == 0) signal_ready(a, sg, row0, col0, BM, BN);
    }
  }
#else
  __trap();  // launched only on compute capability 9.0 from an sm_90a build (see the launcher)
#endif
}

// ---- host: tensor maps.

// cuTensorMapEncodeTiled from the driver through the runtime (no libcuda link); nullptr if the
// driver lacks it. The function pointer cannot go stale; the maps themselves are encoded per launch.
inline PFN_cuTensorMapEncodeTiled_v12000 wg_encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky, but keep the error state clean for the caller
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// Rows of a tensor map covering every row a launch's segments touch: max over segments of
// (offset / ld + rows); 0 if an offset is not a whole number of rows or a coordinate would not
// fit the int32 TMA coordinates.
inline long long wg_map_rows(const GemmTable& tab, int cnt, int64_t ld, bool source) {
  long long rows = 0;
  for (int k = 0; k < cnt; ++k) {
    const GemmSeg& g = tab.seg[k];
    const long long off = source ? g.s_off : g.t_off;
    const int n = source ? g.rows : g.cols;
    if (off < 0 || off % ld != 0) return 0;
    const long long end = off / ld + n;
    if (end > INT_MAX) return 0;
    rows = std::max(rows, end);
  }
  return rows;
}

// Whether the TMA kernel takes these inputs: 16-byte-aligned bases, row strides >= d and a
// multiple of 16 bytes, segment offsets whole rows (sizeof(T) = 2), and the driver can encode maps.
inline bool wg_tma_ok(const GemmArgs& a, const GemmTable& tab, int cnt) {
  if (cnt <= 0 || a.d < 1 || a.d > (int64_t(1) << 31) || a.lds < a.d || a.ldt < a.d) return false;
  if (a.lds % 8 != 0 || a.ldt % 8 != 0 || (a.lds * 2) >= (int64_t(1) << 40) || (a.ldt * 2) >= (int64_t(1) << 40))
    return false;
  if (reinterpret_cast<uintptr_t>(a.S) % 16 != 0 || reinterpret_cast<uintptr_t>(a.T) % 16 != 0) return false;
  if (wg_map_rows(tab, cnt, a.lds, true) <= 0 || wg_map_rows(tab, cnt, a.ldt, false) <= 0) return false;
  return wg_encode_fn() != nullptr;
}

// 2D map of a 16-bit rows x d matrix with row stride ld elements: box 64 (k) x box_rows, 128-byte
// swizzle, zero fill out of bounds.
template <typename T>
inline bool wg_encode_map(CUtensorMap* m, const void* base, int64_t d, int64_t ld, long long rows, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 fn = wg_encode_fn();
  if (!fn) return false;
  const CUtensorMapDataType dt =
      std::is_same<T, __nv_bfloat16>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t dims[2] = {cuuint64_t(d), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld) * sizeof(T)};  // bytes, dimension 1
  const cuuint32_t box[2] = {64u, cuuint32_t(box_rows)};
  const cuuint32_t estr[2] = {1u, 1u};
  return fn(m, dt, 2u, const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// Launches one wgmma config. cudaErrorInvalidValue where wg_tma_ok fails (the launcher sends those
// inputs to the mma.sync kernel).
template <typename T, class Cfg, bool PARTIAL>
inline cudaError_t launch_cost_gemm_wg_cfg(const GemmArgs& a, const GemmTable& tab, int cnt, int max_rows,
                                           int max_cols, cudaStream_t st) {
  static_assert(sizeof(T) == 2, "16-bit inputs");
  if (!wg_tma_ok(a, tab, cnt)) return cudaErrorInvalidValue;
  alignas(64) CUtensorMap ms, mt;
  if (!wg_encode_map<T>(&ms, a.S, a.d, a.lds, wg_map_rows(tab, cnt, a.lds, true), Cfg::BM) ||
      !wg_encode_map<T>(&mt, a.T, a.d, a.ldt, wg_map_rows(tab, cnt, a.ldt, false), Cfg::BN))
    return cudaErrorInvalidValue;
  constexpr auto kernel = cost_gemm_wg_kernel<T, Cfg, PARTIAL>;
  const cudaError_t e = raise_smem_once<kernel>(int(Cfg::SMEM));
  if (e != cudaSuccess) return e;
  GemmArgs b;
  dim3 grid;
  if (!gemm_grid(a, PARTIAL, cnt, max_rows, max_cols, Cfg::BM, Cfg::BN, &b, &grid)) return cudaErrorInvalidValue;
  kernel<<<grid, Cfg::NT, Cfg::SMEM, st>>>(b, tab, ms, mt);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace topv
