"""TopV selection kernels: top-k flags by exact rank, then per-segment compaction with uniform recovery."""

import triton
import triton.language as tl

from .common import SEG_COLS, _segment


@triton.jit
def _top_flag_kernel(score_ptr, flag_ptr, seg_ptr, n_pad, k_top_pad, PADDED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    """flag_i = 1 iff rank_i < k_top, rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)} in the segment.

    NaN scores count as -inf, so they rank below every number, lower index first. The ranks are a
    permutation of 0..n-1 whatever the scores, so exactly k_top flags are set.
    """
    pid = tl.program_id(0)
    z = tl.program_id(1)
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, n_pad, PADDED)
    if PADDED:
        k_top = k_top_pad
    else:
        k_top = tl.load(seg_ptr + z * SEG_COLS + 5)
    if pid * BM >= n:
        return
    i = pid * BM + tl.arange(0, BM)
    imask = i < n
    si = tl.load(score_ptr + row0 + i, mask=imask, other=float("-inf"))
    si = tl.where(si != si, float("-inf"), si)
    # counts accumulate elementwise and are reduced once (a reduction per step costs shuffles)
    beaten = tl.zeros([BM, BN], tl.int32)
    for j0 in range(0, n, BN):
        j = j0 + tl.arange(0, BN)
        jmask = j < n
        sj = tl.load(score_ptr + row0 + j, mask=jmask, other=float("-inf"))
        sj = tl.where(sj != sj, float("-inf"), sj)
        beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
        beaten += (beats & jmask[None, :]).to(tl.int32)
    rank = tl.sum(beaten, axis=1)
    tl.store(flag_ptr + row0 + i, (rank < k_top).to(tl.int32), mask=imask)


@triton.jit
def _compact_kernel(flag_ptr, kept_ptr, seg_ptr, n_pad, k_top_pad, k_rec_pad, keep_pad,
                    PADDED: tl.constexpr, LOCAL: tl.constexpr, BLOCK: tl.constexpr):
    """Kept indices of one segment, ascending (grid: segments), integer math only.

    Non-top token i has rest position r = i - #top before i; it is recovered iff some
    j < k_rec has ((2j+1) L) // (2 k_rec) == r, L = n - k_top, i.e. iff the smallest j with
    (2j+1) L >= 2 k_rec r, j* = max(0, ceil((2 k_rec r - L) / (2L))), has j* < k_rec and
    (2j*+1) L < 2 k_rec (r+1). Output slot = #kept before i. LOCAL stores i, else row0 + i.
    """
    z = tl.program_id(0)
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, n_pad, PADDED)
    if PADDED:
        k_top = tl.zeros([], tl.int64) + k_top_pad
        k_rec = tl.zeros([], tl.int64) + k_rec_pad
        out0 = z.to(tl.int64) * keep_pad
    else:
        k_top = tl.load(seg_ptr + z * SEG_COLS + 5)
        k_rec = tl.load(seg_ptr + z * SEG_COLS + 6)
        out0 = tl.load(seg_ptr + z * SEG_COLS + 7)
    big_l = n - k_top
    two_l = 2 * tl.maximum(big_l, 1)
    top_before = tl.zeros([], tl.int64)
    kept_before = tl.zeros([], tl.int64)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        imask = i < n
        top = tl.load(flag_ptr + row0 + i, mask=imask, other=0).to(tl.int64)
        r = i.to(tl.int64) - (top_before + tl.cumsum(top, axis=0) - top)
        num = 2 * k_rec * r - big_l
        j_star = tl.where(num > 0, (num + two_l - 1) // two_l, 0)
        rec = (top == 0) & (j_star < k_rec) & ((2 * j_star + 1) * big_l < 2 * k_rec * (r + 1))
        kept = (imask & ((top != 0) | rec)).to(tl.int64)
        slot = kept_before + tl.cumsum(kept, axis=0) - kept
        if LOCAL:
            idx = i.to(tl.int64)
        else:
            idx = row0 + i
        tl.store(kept_ptr + out0 + slot, idx, mask=kept != 0)
        top_before += tl.sum(top, axis=0)
        kept_before += tl.sum(kept, axis=0)
