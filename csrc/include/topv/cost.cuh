// Cost-matrix kernels: prune's prep kernel (clears state, checks finiteness) and the cost GEMM
// with row norms and the cost formula fused in.
//
// C_ij = alpha (1 - cos(s_i, t_j)) / 2 + beta (1 - exp(-|p_i - q_j|^2 / (2 sigma^2)))
//        + gamma |p_i - c| / sqrt(0.5)
// The dot products run on tensor cores for fp16/bf16 (WMMA = mma.sync, fp32 accumulate; the
// products of 16-bit inputs are exact in fp32) and on FMA units for fp32 inputs: TF32 would put a
// ~5e-4 relative error into C, i.e. into the exponent of the plan as dC / eps.
#pragma once

#include <mma.h>

#include "topv/common.cuh"

namespace topv {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Prune's first kernel: clears the potentials and done flags and, with check_finite, flags any
// non-finite feature or position. (Row norms come from the GEMM, which has the rows in shared
// memory anyway, so unchecked calls never read the features twice.)
// ---------------------------------------------------------------------------------------------

struct CheckMat {
  const void* data;
  int64_t row_stride, rows;
};

template <typename T>
__global__ __launch_bounds__(256) void prep_kernel(CheckMat a, CheckMat b, int64_t d, bool vec, const float* pos,
                                                   int64_t pos_elems, int* nonfinite, unsigned* clear,
                                                   int64_t clear_words) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t w = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x; w < clear_words;
       w += int64_t(gridDim.x) * gridDim.y * blockDim.x)
    clear[w] = 0u;
  if (!nonfinite) return;
  const int64_t r = int64_t(blockIdx.x) * 8 + warp;
  const CheckMat M = blockIdx.y == 0 ? a : b;
  bool bad = false;
  if (blockIdx.y == 0)  // positions ride along with the first matrix, 2 floats per warp-row
    for (int64_t e = r * 2 + lane; e < r * 2 + 2 && e < pos_elems; e += 32) bad |= !isfinite(pos[e]);
  if (r < M.rows) {
    const T* x = static_cast<const T*>(M.data) + r * M.row_stride;
    if (vec) {  // 16-byte loads: d and the stride are multiples of 16 bytes, the base is aligned
      constexpr int V = 16 / sizeof(T);
      const uint4* x4 = reinterpret_cast<const uint4*>(x);
      for (int64_t k = lane; k < d / V; k += 32) {
        uint4 u = __ldg(x4 + k);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int t = 0; t < V; ++t) bad |= !isfinite(to_float(e[t]));
      }
    } else {
      for (int64_t k = lane; k < d; k += 32) bad |= !isfinite(to_float(x[k]));
    }
  }
  if (__any_sync(0xffffffffu, bad) && lane == 0) *nonfinite = 1;
}

// ---------------------------------------------------------------------------------------------
// Cost GEMM. One launch covers up to kMaxSegmentsPerLaunch independent (rows x cols) blocks of C
// (segments of a packed batch, batch elements, or row chunks of one large segment), described
// by a table passed by value. Block z of the grid is segment z.
// ---------------------------------------------------------------------------------------------

struct GemmSeg {
  long long s_off, t_off, c_off;  // element offsets: source row 0, target row 0, C(0, 0)
  int p_off, q_off;               // float offsets of position pair 0 (source / target)
  int rows, cols;                 // C block is rows x cols, leading dimension cols
  int id;                         // segment id for the done flags (prune's early exit)
};

struct GemmTable {
  GemmSeg seg[kMaxSegmentsPerLaunch];
};

struct GemmArgs {
  const void* S;
  const void* T;
  int64_t lds, ldt, d;
  const float* P;
  const float* Q;
  int64_t p_rs, q_rs;  // position row strides (floats)
  float* C;
  const int* done;  // skip segments already converged (nullptr: none)
  float half_alpha, beta, neg_inv_2s2, gamma;
};

// dot = s_i . t_j; inv_st = 1 / (|s_i| |t_j|) (0 when either is 0).
__device__ __forceinline__ float cost_value(const GemmArgs& a, const GemmSeg& sg, int i, int j, float dot,
                                           float inv_st) {
  const float* p = a.P + sg.p_off + int64_t(i) * a.p_rs;
  const float* q = a.Q + sg.q_off + int64_t(j) * a.q_rs;
  const float pr = p[0], pc = p[1];
  const float dr = pr - q[0], dc = pc - q[1];
  const float cr = pr - kCentre, cc = pc - kCentre;
  const float cosv = dot * inv_st;
  return a.half_alpha * (1.0f - cosv) + a.beta * (1.0f - __expf((dr * dr + dc * dc) * a.neg_inv_2s2)) +
         a.gamma * sqrtf(cr * cr + cc * cc) * kInvMaxCentreDist;
}

__device__ __forceinline__ float inv_norm(float sumsq) { return sumsq > 0.0f ? 1.0f / sqrtf(sumsq) : 0.0f; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Tensor-core GEMM for 16-bit inputs: block tile BM x BN, warp tile WM x WN, k step 32, a
// STAGES-deep cp.async pipeline (dynamic shared memory). Thread t also sums the squares of tile
// row t (A rows, then B rows) from shared memory, which gives the row norms for the epilogue.
// VEC: 16-byte loads (d and strides multiples of 8 elements, aligned base).
template <int BM, int BN, int STAGES, typename T>
__host__ __device__ constexpr size_t mma_smem_bytes() {
  return size_t(STAGES) * (BM + BN) * 40 * sizeof(T);
}

template <typename T, int BM, int BN, int WM, int WN, int STAGES, bool VEC>
__global__ __launch_bounds__((BM / WM) * (BN / WN) * 32) void cost_gemm_mma_kernel(GemmArgs a, GemmTable tab) {
  using namespace nvcuda;
  constexpr int BK = 32, LDT = BK + 8;  // +8 elements: rows 80 B apart, no bank conflicts on row reads
  constexpr int NW = (BM / WM) * (BN / WN), NT = NW * 32;
  static_assert(NT == BM + BN, "one thread per tile row for the norms");
  constexpr int STAGE = (BM + BN) * LDT;
  constexpr int FM = WM / 16, FN = WN / 16;
  constexpr int SCR = 16 * 20;  // per-warp epilogue scratch (floats), ld 20
  static_assert(size_t(NW) * SCR * 4 <= mma_smem_bytes<BM, BN, STAGES, T>(), "scratch fits the stages");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_inv[BM + BN];
  T* sm = reinterpret_cast<T*>(smem_raw);

  const GemmSeg& sg = tab.seg[blockIdx.z];
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  if (row0 >= sg.rows || col0 >= sg.cols) return;
  if (a.done && a.done[sg.id]) return;
  const T* S = static_cast<const T*>(a.S) + sg.s_off;
  const T* Tm = static_cast<const T*>(a.T) + sg.t_off;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / (BN / WN), wn = warp % (BN / WN);

  auto load_tile = [&](int stage, int64_t k0) {
    T* dst0 = sm + stage * STAGE;
    for (int c = tid; c < (BM + BN) * (BK / 8); c += NT) {
      const int r = c / (BK / 8), kc = (c % (BK / 8)) * 8;
      const bool is_a = r < BM;
      const int gr = is_a ? row0 + r : col0 + (r - BM);
      const bool valid = gr < (is_a ? sg.rows : sg.cols);
      const T* src = is_a ? S + int64_t(gr) * a.lds : Tm + int64_t(gr) * a.ldt;
      T* dst = dst0 + r * LDT + kc;
      if constexpr (VEC) {
        const bool ok = valid && k0 + kc < a.d;
        cp_async16(dst, ok ? static_cast<const void*>(src + k0 + kc) : static_cast<const void*>(a.S), ok);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int64_t k = k0 + kc + e;
          dst[e] = (valid && k < a.d) ? src[k] : zero_of<T>();
        }
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const int64_t ktiles = (a.d + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, int64_t(s) * BK);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  float sumsq = 0.0f;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed
    __syncthreads();              // ... for every thread, and every warp is done with tile kt - 1
    {
      const int64_t nk = kt + STAGES - 1;
      if (nk < ktiles) load_tile(int(nk % STAGES), nk * BK);  // refills the stage of tile kt - 1
      cp_async_commit();
    }
    const T* st = sm + int(kt % STAGES) * STAGE;
    {
      const uint4* row = reinterpret_cast<const uint4*>(st + tid * LDT);
#pragma unroll
      for (int q = 0; q < BK / 8; ++q) {
        const uint4 u = row[q];
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float v = to_float(e[t]);
          sumsq = fmaf(v, v, sumsq);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], st + (wm * WM + i * 16) * LDT + kk, LDT);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], st + (BM + wn * WN + j * 16) * LDT + kk, LDT);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  s_inv[tid] = inv_norm(sumsq);
  __syncthreads();  // the stages become epilogue scratch; s_inv is complete

  float* scr = reinterpret_cast<float*>(smem_raw) + warp * SCR;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(scr, acc[i][j], 20, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int lr = wm * WM + i * 16 + e / 16, lc = wn * WN + j * 16 + e % 16;
        const int r = row0 + lr, c = col0 + lc;
        if (r < sg.rows && c < sg.cols)
          a.C[sg.c_off + int64_t(r) * sg.cols + c] =
              cost_value(a, sg, r, c, scr[(e / 16) * 20 + e % 16], s_inv[lr] * s_inv[BM + lc]);
      }
      __syncwarp();
    }
}

// fp32 GEMM on FMA units (no TF32): 64 x 64 block tile, 4 x 4 outputs per thread.
__global__ __launch_bounds__(256) void cost_gemm_f32_kernel(GemmArgs a, GemmTable tab) {
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ float As[BK][BM + 4], Bs[BK][BN + 4];
  const GemmSeg& sg = tab.seg[blockIdx.z];
  const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
  if (row0 >= sg.rows || col0 >= sg.cols) return;
  if (a.done && a.done[sg.id]) return;
  const float* S = static_cast<const float*>(a.S) + sg.s_off;
  const float* Tm = static_cast<const float*>(a.T) + sg.t_off;
  __shared__ float s_inv[BM + BN];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  float sumsq = 0.0f;  // threads 0..63: A row tid; 64..127: B row tid - 64
  for (int64_t k0 = 0; k0 < a.d; k0 += BK) {
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int e = tid + it * 256, r = e / BK, kk = e % BK;
      const int64_t k = k0 + kk;
      const int ra = row0 + r, cb = col0 + r;
      As[kk][r] = (ra < sg.rows && k < a.d) ? S[int64_t(ra) * a.lds + k] : 0.0f;
      Bs[kk][r] = (cb < sg.cols && k < a.d) ? Tm[int64_t(cb) * a.ldt + k] : 0.0f;
    }
    __syncthreads();
    if (tid < BM + BN) {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float v = tid < BM ? As[kk][tid] : Bs[kk][tid - BM];
        sumsq = fmaf(v, v, sumsq);
      }
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
  if (tid < BM + BN) s_inv[tid] = inv_norm(sumsq);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = row0 + ty * 4 + i, c = col0 + tx * 4 + j;
      if (r < sg.rows && c < sg.cols)
        a.C[sg.c_off + int64_t(r) * sg.cols + c] =
            cost_value(a, sg, r, c, acc[i][j], s_inv[ty * 4 + i] * s_inv[BM + tx * 4 + j]);
    }
}

}  // namespace detail
}  // namespace topv
