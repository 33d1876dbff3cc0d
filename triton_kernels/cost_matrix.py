"""TopV cost matrix kernels: row inverse norms (+ non-finite flag) and the fused GEMM + epilogue.

The float32 cosine acc * inv_s * inv_t is safe while each row's squared norm lies in
[2^-60, 2^120]: no square, product or sum overflows, and what flushes to zero moves the cosine by
< d 2^-66. A row outside that range (a zero row; |x| ~ 1e19, whose square is inf in float32; tiny
values whose squares underflow) gets the inverse norm +inf, and the tiles that hold one recompute
those cosines exactly in float64 (_store_exact): rare, and kept out of the GEMM's registers.
"""

import triton
import triton.language as tl

from .common import _segment

MIN_SAFE_SQ = tl.constexpr(8.673617379884035e-19)  # 2^-60
MAX_SAFE_SQ = tl.constexpr(1.329227995784916e36)  # 2^120
EXACT_ROWS = tl.constexpr(8)  # rows per step of the float64 path (its accumulators stay small)


@triton.jit
def _inv_norm_rows(x_ptr, inv_ptr, pos_ptr, bad_ptr, pid, rows, n_inner, d, pos_rows, stride_b, stride_r, stride_k,
                   CHECK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    b = r // n_inner
    i = r - b * n_inner
    base = b.to(tl.int64) * stride_b + i.to(tl.int64) * stride_r
    ss = tl.zeros([BLOCK_R], tl.float32)
    nbad = tl.zeros([BLOCK_R], tl.int32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (k < d)[None, :]
        x = tl.load(x_ptr + base[:, None] + k[None, :].to(tl.int64) * stride_k, mask=mask, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        if CHECK:
            # |x| < inf is false for NaN and for +-Inf
            nbad += tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)
    safe = (ss >= MIN_SAFE_SQ) & (ss <= MAX_SAFE_SQ)
    # NaN rows (ss is NaN) keep the plain formula: their scores are unspecified (check_finite).
    inv = tl.where(safe | (ss != ss), 1.0 / tl.sqrt_rn(ss), float("inf"))
    tl.store(inv_ptr + r, inv, mask=rmask)
    if CHECK:
        pmask = r < pos_rows
        for c in tl.static_range(2):
            pv = tl.load(pos_ptr + r.to(tl.int64) * 2 + c, mask=pmask, other=0.0)
            nbad += tl.where(tl.abs(pv) < float("inf"), 0, 1)
        tl.atomic_max(bad_ptr, (tl.max(nbad, axis=0) > 0).to(tl.int32))


@triton.jit
def _row_inv_norm_kernel(
    x_ptr, inv_x_ptr, y_ptr, inv_y_ptr, pos_ptr, bad_ptr,
    x_rows, x_inner, y_rows, y_inner, d, pos_rows,
    x_sb, x_sr, x_sk, y_sb, y_sr, y_sk,
    CHECK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """inv[r] = 1/||row r|| of x (program axis 1 = 0) or y (axis 1 = 1), each a (B, inner, d) strided
    view flattened as r = b*inner + i; +inf for a row whose cosines take the float64 path.

    CHECK: also sets *bad_ptr to 1 when any element of these rows, or any of the first
    ``pos_rows`` (row, 2) positions at pos_ptr (checked with x), is NaN or Inf. Each element is
    checked once here, so the GEMM's main loop carries no extra work for the flag.
    """
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        _inv_norm_rows(x_ptr, inv_x_ptr, pos_ptr, bad_ptr, pid, x_rows, x_inner, d, pos_rows, x_sb, x_sr, x_sk,
                       CHECK, BLOCK_R, BLOCK_D)
    else:
        _inv_norm_rows(y_ptr, inv_y_ptr, pos_ptr, bad_ptr, pid, y_rows, y_inner, d, 0, y_sb, y_sr, y_sk,
                       CHECK, BLOCK_R, BLOCK_D)


@triton.jit
def _tile_rows(z, row0, col0, c_off, i, j, s_sb, s_sr, t_sb, t_sr, p_sb, p_sr, q_sb, q_sr, c_sb, ldc, m,
               PADDED: tl.constexpr):
    """Row offsets of a (i, j) tile: source, target, source/target positions, C base, C row stride.
    PADDED: segment z's rows are at z*s_sb + i*s_sr (batched strided views); otherwise the table
    gives packed rows row0 + i (and col0 + j for the target)."""
    if PADDED:
        zz = z.to(tl.int64)
        return (zz * s_sb + i.to(tl.int64) * s_sr, zz * t_sb + j.to(tl.int64) * t_sr,
                zz * p_sb + i.to(tl.int64) * p_sr, zz * q_sb + j.to(tl.int64) * q_sr, zz * c_sb, ldc + zz * 0)
    else:
        return (row0 + i) * s_sr, (col0 + j) * t_sr, (row0 + i) * p_sr, (col0 + j) * q_sr, c_off, m


@triton.jit
def _cost_of(cos, imask, jmask, p_ptr, q_ptr, p_row, q_row, p_sc, q_sc, alpha, beta, gamma, neg_half_inv_sigma2,
             out_scale):
    """out_scale * C of a tile from its cosines."""
    px = tl.load(p_ptr + p_row, mask=imask, other=0.0)
    py = tl.load(p_ptr + p_row + p_sc, mask=imask, other=0.0)
    qx = tl.load(q_ptr + q_row, mask=jmask, other=0.0)
    qy = tl.load(q_ptr + q_row + q_sc, mask=jmask, other=0.0)
    dx = px[:, None] - qx[None, :]
    dy = py[:, None] - qy[None, :]
    spatial = 1.0 - tl.exp((dx * dx + dy * dy) * neg_half_inv_sigma2)
    cx = px - 0.5
    cy = py - 0.5
    centre = tl.sqrt_rn(cx * cx + cy * cy) * 1.4142135623730951  # / sqrt(0.5)
    c = alpha * ((1.0 - cos) * 0.5) + beta * spatial + (gamma * centre)[:, None]
    return c * out_scale


@triton.jit
def _epilogue(acc, i, j, imask, jmask, row0, col0, inv_s_ptr, inv_t_ptr, p_ptr, q_ptr, p_row, q_row, p_sc, q_sc,
              alpha, beta, gamma, neg_half_inv_sigma2, out_scale):
    """out_scale * C of a tile from its raw feature dot products acc (fp32), and whether a row or
    column of the tile needs the float64 path (inverse norm +inf: its entries are then not final).
    The flag reduces the BM + BN inverse norms, not the tile: a tile-wide reduction cost the GEMM
    3-5 % at n = 576-3328 on the H100."""
    inv_s = tl.load(inv_s_ptr + row0 + i, mask=imask, other=1.0)
    inv_t = tl.load(inv_t_ptr + col0 + j, mask=jmask, other=1.0)
    c = _cost_of(acc * inv_s[:, None] * inv_t[None, :], imask, jmask, p_ptr, q_ptr, p_row, q_row, p_sc, q_sc, alpha,
                 beta, gamma, neg_half_inv_sigma2, out_scale)
    return c, (tl.max(inv_s, axis=0) == float("inf")) | (tl.max(inv_t, axis=0) == float("inf"))


@triton.jit
def _store_exact(s_ptr, t_ptr, p_ptr, q_ptr, inv_s_ptr, inv_t_ptr, c_ptr, z, row0, col0, c_off, i_lo, n, row_hi, j,
                 jmask, c_row0, d, s_sb, s_sr, s_sk, t_sb, t_sr, t_sk, p_sb, p_sr, p_sc, q_sb, q_sr, q_sc, c_sb, ldc,
                 m, alpha, beta, gamma, neg_half_inv_sigma2, out_scale,
                 PADDED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Overwrites the tile's entries whose row or column has the inverse norm +inf with C from the
    cosine computed in float64 (no float32 square or product on the way), EXACT_ROWS rows at a time."""
    inv_t = tl.load(inv_t_ptr + col0 + j, mask=jmask, other=1.0)
    for r0 in range(0, BM, EXACT_ROWS):
        i = i_lo + r0 + tl.arange(0, EXACT_ROWS)
        imask = (i < n) & (i < row_hi)
        inv_s = tl.load(inv_s_ptr + row0 + i, mask=imask, other=1.0)
        redo = (inv_s[:, None] * inv_t[None, :] == float("inf")) & imask[:, None] & jmask[None, :]
        if tl.max(tl.where(redo, 1, 0)) > 0:
            s_row, t_row, p_row, q_row, c_base, ld = _tile_rows(z, row0, col0, c_off, i, j, s_sb, s_sr, t_sb, t_sr,
                                                                p_sb, p_sr, q_sb, q_sr, c_sb, ldc, m, PADDED)
            dot = tl.zeros([EXACT_ROWS, BN], tl.float64)
            ss = tl.zeros([EXACT_ROWS], tl.float64)
            tt = tl.zeros([BN], tl.float64)
            for k in range(0, d):
                a = tl.load(s_ptr + s_row + k * s_sk, mask=imask, other=0.0).to(tl.float64)
                b = tl.load(t_ptr + t_row + k * t_sk, mask=jmask, other=0.0).to(tl.float64)
                dot += a[:, None] * b[None, :]
                ss += a * a
                tt += b * b
            den = tl.sqrt(ss)[:, None] * tl.sqrt(tt)[None, :]
            cos = tl.where(den > 0, dot / tl.where(den > 0, den, 1.0), 0.0).to(tl.float32)
            c = _cost_of(cos, imask, jmask, p_ptr, q_ptr, p_row, q_row, p_sc, q_sc, alpha, beta, gamma,
                         neg_half_inv_sigma2, out_scale)
            tl.store(c_ptr + c_base + (i - c_row0).to(tl.int64)[:, None] * ld + j[None, :], c, mask=redo)


@triton.jit
def _cost_kernel(
    s_ptr, t_ptr, p_ptr, q_ptr, inv_s_ptr, inv_t_ptr, c_ptr, seg_ptr,
    n_pad, m_pad, d, row_lo, row_hi, c_row0, k_chunk, split_stride,
    s_sb, s_sr, s_sk, t_sb, t_sr, t_sk,
    p_sb, p_sr, p_sc, q_sb, q_sr, q_sc, c_sb, ldc,
    alpha, beta, gamma, neg_half_inv_sigma2, out_scale,
    PADDED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out_scale * C for rows [row_lo, row_hi) of each segment (grid: row tiles, column tiles,
    segments * SPLIT_K).

    C_ij = alpha (1 - cos(s_i, t_j))/2 + beta (1 - exp(-|p_i - q_j|^2 / (2 sigma^2))) + gamma |p_i - c|/sqrt(.5)
    The feature dot product runs on tensor cores with an fp32 accumulator (IEEE fp32 for fp32
    inputs: a TF32 error would enter the Sinkhorn exponent as dC/eps). Row i of the tile is
    stored at row (i - c_row0) of the segment's block of C, so a caller can materialise a slab.
    SPLIT_K > 1 (too few tiles to fill the GPU): program k of a tile sums features
    [k*k_chunk, (k+1)*k_chunk) and stores the raw dot products at c_ptr + k*split_stride;
    _cost_split_epilogue_kernel adds them in a fixed order (deterministic) and finishes C.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2) // SPLIT_K
    ks = tl.program_id(2) % SPLIT_K
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, m_pad, PADDED)
    i_lo = row_lo + pid_m * BM
    j_lo = pid_n * BN
    if (i_lo >= n) | (i_lo >= row_hi) | (j_lo >= m):
        return
    i = i_lo + tl.arange(0, BM)
    j = j_lo + tl.arange(0, BN)
    imask = (i < n) & (i < row_hi)
    jmask = j < m
    s_row, t_row, p_row, q_row, c_base, ld = _tile_rows(z, row0, col0, c_off, i, j, s_sb, s_sr, t_sb, t_sr, p_sb,
                                                        p_sr, q_sb, q_sr, c_sb, ldc, m, PADDED)
    if SPLIT_K > 1:  # k_chunk is a multiple of BK: only the end of d needs a mask
        k_lo = ks * k_chunk
        k_hi = tl.minimum(d, k_lo + k_chunk)
    else:
        k_lo = 0
        k_hi = d
    kk = tl.arange(0, BK)
    a_ptrs = s_ptr + s_row[:, None] + (k_lo + kk)[None, :] * s_sk
    b_ptrs = t_ptr + t_row[None, :] + (k_lo + kk)[:, None] * t_sk
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kmask = (k0 + kk) < d
        a = tl.load(a_ptrs, mask=imask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & jmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * s_sk
        b_ptrs += BK * t_sk
    c_ptrs = c_ptr + c_base + (i - c_row0).to(tl.int64)[:, None] * ld + j[None, :]
    mask = imask[:, None] & jmask[None, :]
    if SPLIT_K > 1:
        tl.store(c_ptrs + ks.to(tl.int64) * split_stride, acc, mask=mask)
    else:
        c, exact = _epilogue(acc, i, j, imask, jmask, row0, col0, inv_s_ptr, inv_t_ptr, p_ptr, q_ptr, p_row, q_row,
                             p_sc, q_sc, alpha, beta, gamma, neg_half_inv_sigma2, out_scale)
        tl.store(c_ptrs, c, mask=mask)
        if exact:
            _store_exact(s_ptr, t_ptr, p_ptr, q_ptr, inv_s_ptr, inv_t_ptr, c_ptr, z, row0, col0, c_off, i_lo, n, row_hi,
                         j, jmask, c_row0, d, s_sb, s_sr, s_sk, t_sb, t_sr, t_sk, p_sb, p_sr, p_sc, q_sb, q_sr, q_sc,
                         c_sb, ldc, m, alpha, beta, gamma, neg_half_inv_sigma2, out_scale, PADDED, BM, BN)


@triton.jit
def _cost_split_epilogue_kernel(
    part_ptr, s_ptr, t_ptr, p_ptr, q_ptr, inv_s_ptr, inv_t_ptr, c_ptr, seg_ptr,
    n_pad, m_pad, d, n_split, split_stride,
    s_sb, s_sr, s_sk, t_sb, t_sr, t_sk, p_sb, p_sr, p_sc, q_sb, q_sr, q_sc, c_sb, ldc,
    alpha, beta, gamma, neg_half_inv_sigma2, out_scale,
    PADDED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """C from the split-K partial dot products (same layout as C, n_split copies), summed in
    split order (grid: row tiles, column tiles, segments)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2)
    row0, n, col0, m, c_off = _segment(seg_ptr, z, n_pad, m_pad, PADDED)
    if (pid_m * BM >= n) | (pid_n * BN >= m):
        return
    i = pid_m * BM + tl.arange(0, BM)
    j = pid_n * BN + tl.arange(0, BN)
    imask = i < n
    jmask = j < m
    s_row, t_row, p_row, q_row, c_base, ld = _tile_rows(z, row0, col0, c_off, i, j, s_sb, s_sr, t_sb, t_sr, p_sb,
                                                        p_sr, q_sb, q_sr, c_sb, ldc, m, PADDED)
    offs = c_base + i.to(tl.int64)[:, None] * ld + j[None, :]
    mask = imask[:, None] & jmask[None, :]
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, n_split):
        acc += tl.load(part_ptr + k * split_stride + offs, mask=mask, other=0.0)
    c, exact = _epilogue(acc, i, j, imask, jmask, row0, col0, inv_s_ptr, inv_t_ptr, p_ptr, q_ptr, p_row, q_row, p_sc,
                         q_sc, alpha, beta, gamma, neg_half_inv_sigma2, out_scale)
    tl.store(c_ptr + offs, c, mask=mask)
    if exact:
        _store_exact(s_ptr, t_ptr, p_ptr, q_ptr, inv_s_ptr, inv_t_ptr, c_ptr, z, row0, col0, c_off, pid_m * BM, n, n, j,
                     jmask, 0, d, s_sb, s_sr, s_sk, t_sb, t_sr, t_sk, p_sb, p_sr, p_sc, q_sb, q_sr, q_sc, c_sb, ldc, m,
                     alpha, beta, gamma, neg_half_inv_sigma2, out_scale, PADDED, BM, BN)
