"""Log-domain Sinkhorn kernels (base 2): a row pass and a column merge per iteration.

Potentials are kept in units of eps/ln 2: F = f log2(e)/eps, G = g log2(e)/eps and
K = C log2(e)/eps, so every exponential is an exp2 and every log a log2:
    F_i <- kappa_a (log2 a_i - LSE2_j(G_j - K_ij)),   G_j <- kappa_b (log2 b_j - LSE2_i(F_i - K_ij)),
kappa = tau / (tau + eps) being 1 for an exact marginal (docs/algorithm.md).
"""

import triton
import triton.language as tl

from .common import _segment

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sinkhorn_row_kernel(
    k_ptr, seg_ptr, n_pad, m_pad, row_lo, row_hi, c_row0, k_scale, kappa_a, rho_a,
    f_ptr, fn_ptr, g_ptr, la_ptr, pmax_ptr, psum_ptr, vpart_ptr, score_ptr, done_ptr,
    m_total, n_seg,
    PADDED: tl.constexpr, FIRST: tl.constexpr, HAS_TOL: tl.constexpr, CHECK: tl.constexpr,
    PARTIALS: tl.constexpr, SCORE: tl.constexpr, HAS_LA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    """Row update F' of BM rows of one segment (grid: row blocks of [row_lo, row_hi), segments).

    Reads K (times k_scale) from rows (i - c_row0) of the segment's block at c_off.
    FIRST: G = 0 and F = 0 (the first iteration reads no potentials).
    HAS_TOL: segments flagged in done_ptr are skipped, F' goes to fn_ptr (the merge commits it),
      otherwise F' overwrites F in place (each program owns its rows).
    With L_i = LSE2_j(G_j - K_ij), the plan (F, G) has row mass 2^(F_i + L_i):
    CHECK: writes this block's part of sum_i |2^(F_i + L_i) - a_i 2^(-rho_a F_i)| (the relaxed row
      violation of the plan (F, G), rho_a = eps / tau_a) to vpart_ptr[block * n_seg + z].
    SCORE: writes score_i = n 2^(F_i + L_i) (n times the row mass).
    PARTIALS: writes this block's column max and sum of 2^(F'_i - K_ij) to pmax/psum[pid, col0 + j].
    ONE_CHUNK: BN >= every segment's m, so pass 2 reuses pass 1's tile instead of re-reading K.
    """
    pid = tl.program_id(0)
    z = tl.program_id(1)
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, m_pad, PADDED)
    i_lo = row_lo + pid * BM
    if (i_lo >= n) | (i_lo >= row_hi):
        return
    if HAS_TOL and not FIRST:
        if tl.load(done_ptr + z) != 0:
            return
    i = i_lo + tl.arange(0, BM)
    imask = (i < n) & (i < row_hi)
    k_rows = k_ptr + c_off + (i - c_row0).to(tl.int64)[:, None] * m
    # pass 1: online LSE2 over the segment's columns (ONE_CHUNK: one tile holds the whole row
    # and stays in registers for pass 2)
    if ONE_CHUNK:
        j = tl.arange(0, BN)
        jmask = j < m
        kv = tl.load(k_rows + j[None, :], mask=imask[:, None] & jmask[None, :], other=0.0) * k_scale
        if FIRST:
            x = -kv
        else:
            x = tl.load(g_ptr + col0 + j, mask=jmask, other=0.0)[None, :] - kv
        x = tl.where(jmask[None, :], x, float("-inf"))
        run_max = tl.max(x, axis=1)
        run_sum = tl.sum(tl.exp2(x - run_max[:, None]), axis=1)
    else:
        run_max = tl.full([BM], float("-inf"), tl.float32)
        run_sum = tl.zeros([BM], tl.float32)
        for j0 in range(0, m, BN):
            j = j0 + tl.arange(0, BN)
            jmask = j < m
            kv = tl.load(k_rows + j[None, :], mask=imask[:, None] & jmask[None, :], other=0.0) * k_scale
            if FIRST:
                x = -kv
            else:
                x = tl.load(g_ptr + col0 + j, mask=jmask, other=0.0)[None, :] - kv
            x = tl.where(jmask[None, :], x, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(x, axis=1))
            run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(x - new_max[:, None]), axis=1)
            run_max = new_max
    if HAS_LA:
        la = tl.load(la_ptr + row0 + i, mask=imask, other=0.0) * LOG2E
    else:
        la = tl.zeros([BM], tl.float32) - tl.log2(n.to(tl.float32))
    lse = run_max + tl.log2(run_sum)
    f_new = kappa_a * (la - lse)
    if CHECK or SCORE:
        if FIRST:
            f_old = tl.zeros([BM], tl.float32)
        else:
            f_old = tl.load(f_ptr + row0 + i, mask=imask, other=0.0)
        mass = tl.exp2(f_old + lse)  # row mass of the plan (F, G)
        if CHECK:
            viol = tl.where(imask, tl.abs(mass - tl.exp2(la - rho_a * f_old)), 0.0)
            tl.store(vpart_ptr + (row_lo // BM + pid) * n_seg + z, tl.sum(viol, axis=0))
        if SCORE:
            tl.store(score_ptr + row0 + i, n.to(tl.float32) * mass, mask=imask)
    if PARTIALS:
        if HAS_TOL:
            tl.store(fn_ptr + row0 + i, f_new, mask=imask)
        else:
            tl.store(f_ptr + row0 + i, f_new, mask=imask)
        # pass 2: column partials of LSE2_i(F'_i - K_ij) over these rows, indexed by the block
        # within this launch (a streamed slab keeps only its own partials)
        f_col = tl.where(imask, f_new, float("-inf"))
        p_row = pid.to(tl.int64) * m_total + col0
        if ONE_CHUNK:
            y = f_col[:, None] - kv
            cmax = tl.max(y, axis=0)
            tl.store(pmax_ptr + p_row + j, cmax, mask=j < m)
            tl.store(psum_ptr + p_row + j, tl.sum(tl.exp2(y - cmax[None, :]), axis=0), mask=j < m)
        else:
            for j0 in range(0, m, BN):  # K re-read, mostly from L2
                j = j0 + tl.arange(0, BN)
                jmask = j < m
                kv = tl.load(k_rows + j[None, :], mask=imask[:, None] & jmask[None, :], other=0.0) * k_scale
                y = f_col[:, None] - kv
                cmax = tl.max(y, axis=0)
                tl.store(pmax_ptr + p_row + j, cmax, mask=jmask)
                tl.store(psum_ptr + p_row + j, tl.sum(tl.exp2(y - cmax[None, :]), axis=0), mask=jmask)


@triton.jit
def _sinkhorn_merge_kernel(
    pmax_ptr, psum_ptr, vpart_ptr, f_ptr, fn_ptr, g_ptr, lb_ptr, done_ptr, seg_ptr, amax_ptr, asum_ptr,
    n_pad, m_pad, m_total, n_seg, row_block, p_blocks, tol, kappa_b,
    PADDED: tl.constexpr, FIRST: tl.constexpr, HAS_TOL: tl.constexpr, CHECK: tl.constexpr,
    HAS_LB: tl.constexpr, ACC_IN: tl.constexpr, ACC_OUT: tl.constexpr,
    BLOCK: tl.constexpr, RB: tl.constexpr, VBLOCK: tl.constexpr,
):
    """Column update G' from the row blocks' partials (grid: blocks of BLOCK columns/rows, segments).

    HAS_TOL: FIRST clears the segment's done flag; CHECK sums the row pass's violation parts (in a
    fixed order, so every program of the segment takes the same decision) and, below tol, marks
    the segment done and leaves its (F, G) as they were; otherwise G' is stored and F' committed.
    p_blocks: partial rows to read (all row blocks of the segment, or of one streamed slab).
    ACC_IN: also fold the running column (max, sum) at amax/asum (earlier slabs of this pass).
    ACC_OUT: only fold (not the last slab): store the running (max, sum) and stop.
    """
    pid = tl.program_id(0)
    z = tl.program_id(1)
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, m_pad, PADDED)
    n_blocks = (n + row_block - 1) // row_block
    if HAS_TOL:
        if FIRST:
            if not ACC_OUT:
                tl.store(done_ptr + z, 0)
        else:
            if tl.load(done_ptr + z) != 0:
                return
            if CHECK and not ACC_OUT:
                acc = tl.zeros([VBLOCK], tl.float32)
                for r0 in range(0, n_blocks, VBLOCK):
                    r = r0 + tl.arange(0, VBLOCK)
                    acc += tl.load(vpart_ptr + r * n_seg + z, mask=r < n_blocks, other=0.0)
                if tl.sum(acc, axis=0) < tol:
                    tl.store(done_ptr + z, 1)
                    return
    j = pid * BLOCK + tl.arange(0, BLOCK)
    jmask = j < m
    if pid * BLOCK < m:
        if ACC_IN:
            run_max = tl.load(amax_ptr + col0 + j, mask=jmask, other=0.0)
            run_sum = tl.load(asum_ptr + col0 + j, mask=jmask, other=0.0)
        else:
            run_max = tl.full([BLOCK], float("-inf"), tl.float32)
            run_sum = tl.zeros([BLOCK], tl.float32)
        n_read = tl.minimum(p_blocks, n_blocks)
        for r0 in range(0, n_read, RB):  # RB partial rows per step: independent loads in flight
            r = r0 + tl.arange(0, RB)
            mask = (r < n_read)[:, None] & jmask[None, :]
            offs = r.to(tl.int64)[:, None] * m_total + col0 + j[None, :]
            pm = tl.load(pmax_ptr + offs, mask=mask, other=float("-inf"))
            ps = tl.load(psum_ptr + offs, mask=mask, other=0.0)
            new_max = tl.maximum(run_max, tl.max(pm, axis=0))
            ps = tl.where(mask, ps * tl.exp2(pm - new_max[None, :]), 0.0)
            run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(ps, axis=0)
            run_max = new_max
        if ACC_OUT:
            tl.store(amax_ptr + col0 + j, run_max, mask=jmask)
            tl.store(asum_ptr + col0 + j, run_sum, mask=jmask)
        else:
            if HAS_LB:
                lb = tl.load(lb_ptr + col0 + j, mask=jmask, other=0.0) * LOG2E
            else:
                lb = tl.zeros([BLOCK], tl.float32) - tl.log2(m.to(tl.float32))
            tl.store(g_ptr + col0 + j, kappa_b * (lb - (run_max + tl.log2(run_sum))), mask=jmask)
    if HAS_TOL and not ACC_OUT:
        i = pid * BLOCK + tl.arange(0, BLOCK)
        imask = i < n
        tl.store(f_ptr + row0 + i, tl.load(fn_ptr + row0 + i, mask=imask), mask=imask)
