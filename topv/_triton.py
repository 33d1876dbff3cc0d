"""Launchers of the Triton backend (``backend="triton"``): allocation, grids, block sizes, plans.

Called by :mod:`topv.ops` with already-validated, normalised inputs. Everything here is
sync-free and, with ``check_finite=False``, CUDA-graph capturable: output sizes follow from host
arguments, per-layout device tables come from ``Segments.cached`` (built on the first eager call).

Pipeline of ``prune`` (docs/algorithm.md):
1. ``_row_inv_norm_kernel`` on source and target rows (also the fused non-finite check),
2. ``_cost_kernel``: tensor-core GEMM + epilogue writing K = C log2(e)/eps in fp32,
3. per iteration ``_sinkhorn_row_kernel`` (row LSE, column partials, violation part) and
   ``_sinkhorn_merge_kernel`` (column LSE, per-segment early exit), then one more row pass for
   the scores,
4. ``_top_flag_kernel`` (exact ranks) and ``_compact_kernel`` (top + uniform recovery).

When the whole batch's K does not fit the workspace cap (``workspace_cap``) each segment runs
alone and a segment too large for it is streamed: its rows are cut into slabs that fit, and every pass recomputes
each slab's GEMM before the row pass reads it. Slabs are visited in serpentine order so the slab
left in the workspace by one pass is the first one of the next (one GEMM slab saved per pass).
"""

from __future__ import annotations

import math
import os

import torch

from topv import defaults as D
from topv.reference import relaxation
from topv.triton_kernels.cost_matrix import _cost_kernel, _cost_split_epilogue_kernel, _row_inv_norm_kernel
from topv.triton_kernels.prune import _compact_kernel, _top_flag_kernel
from topv.triton_kernels.sinkhorn import _sinkhorn_merge_kernel, _sinkhorn_row_kernel

LOG2E = 1.0 / math.log(2.0)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


# Plain-Python arithmetic: triton.cdiv is itself a @jit function, ~2 us per host call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


# --------------------------------------------------------------------------------------------
# block-size choices (H100 measurements in the report of this backend)
# --------------------------------------------------------------------------------------------


def _cost_config(tiles_128: int, dtype: torch.dtype):
    """(BM, BN, BK, num_warps, num_stages) of the cost GEMM; tiles_128: output tiles at 128x128."""
    if _INTERPRET:
        return 16, 16, 32, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    if tiles_128 < 132:  # too few tiles to fill the GPU: small tiles, long K steps
        return 64, 64, 128, 4, 3
    if tiles_128 < 1024:
        return 64, 128, 64, 4, 3
    return 128, 128, 64, 8, 3


def _row_config(n_max: int, m_max: int, n_seg: int):
    """(BM, BN, ONE_CHUNK, num_warps) of the Sinkhorn row pass.

    A whole row fits one tile up to m = 1024 (ONE_CHUNK: pass 2 reuses it from registers);
    longer rows stream in 512-wide chunks. BM shrinks until the grid has ~2 programs per SM.
    """
    if _INTERPRET:
        bn = min(32, _next_pow2(m_max))
        return 16, bn, bn >= m_max, 4
    if m_max <= 1024:
        bn, one = max(16, _next_pow2(m_max)), True
    else:
        bn, one = 512, False
    bm = min(64, max(4, 8192 // bn))
    while bm > 4 and n_seg * _cdiv(n_max, bm) < 264:
        bm //= 2
    return bm, bn, one, 8 if bm * bn >= 8192 else 4


def _row_block(n_max: int, m_max: int, n_seg: int) -> int:
    return _row_config(n_max, m_max, n_seg)[0]


# Column merge: narrow column blocks and many partial rows per step. The partial rows of one
# column are a serial chain per program, so wide blocks (128 columns x 8 rows) left 5 programs
# doing 18 dependent L2 round trips each at n=576 (19 us per merge on the H100).
_MERGE_BLOCK = 32
_MERGE_RB = 4 if _INTERPRET else 64


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------


def _inv_norms(x, inv_x, y, inv_y, check: bool, pos: torch.Tensor | None, bad):
    """inv_x[b*n + i] = 1/||x[b, i]|| for x (B, n, d), same for y (B, m, d) (any strides); one
    launch; with ``check`` the non-finite flag of x, y and pos (rows, 2) goes to bad."""
    B, n, d = x.shape
    m = y.shape[1]
    # wide rows per step: at B=1, n=576 the 4x512 steps were a latency chain (6 us for 9 MB)
    block_r, block_d, warps = (4, 64, 4) if _INTERPRET else (2, 2048, 8)
    _row_inv_norm_kernel[(_cdiv(B * max(n, m), block_r), 2)](
        x, inv_x, y, inv_y, pos if pos is not None else inv_x, bad if bad is not None else inv_x,
        B * n, n, B * m, m, d, pos.shape[0] if pos is not None else 0,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        CHECK=check, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )


def _split_k(tiles: int, d: int, dtype: torch.dtype) -> int:
    """K splits of the cost GEMM: only when its tiles cannot fill the GPU (B=1, n=576: 81 tiles)."""
    if _INTERPRET or dtype == torch.float32 or d < 1024 or tiles >= 132:
        return 1
    return min(4, 264 // tiles)


def _launch_cost(s, t, p, q, inv_s, inv_t, out, seg, *, padded, n_pad, m_pad, n_seg, d, row_lo, row_hi, c_row0,
                 s_strides, t_strides, p_strides, q_strides, c_sb, ldc, alpha, beta, gamma, sigma, out_scale,
                 rows_max, cols_max, c_total=0):
    """out_scale * C into ``out``; ``c_total`` (elements of out) enables split-K for small problems."""
    bm, bn, bk, warps, stages = _cost_config(
        n_seg * _cdiv(rows_max, 128) * _cdiv(cols_max, 128), s.dtype)
    grid = (_cdiv(rows_max, bm), _cdiv(cols_max, bn), n_seg)
    split = _split_k(grid[0] * grid[1] * grid[2], d, s.dtype) if c_total else 1
    k_chunk = _cdiv(_cdiv(d, split), bk) * bk
    split = _cdiv(d, k_chunk)
    consts = (alpha, beta, gamma, -0.5 / (sigma * sigma), out_scale)
    part = _empty(split * c_total, torch.float32, s.device) if split > 1 else out
    _cost_kernel[(grid[0], grid[1], grid[2] * split)](
        s, t, p, q, inv_s, inv_t, part, seg,
        n_pad, m_pad, d, row_lo, row_hi, c_row0, k_chunk, c_total,
        *s_strides, *t_strides, *p_strides, *q_strides, c_sb, ldc, *consts,
        PADDED=padded, UPCAST=_INTERPRET or s.dtype == torch.float32, IEEE=_INTERPRET or s.dtype == torch.float32,
        SPLIT_K=split, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages,
    )
    if split > 1:
        ebm, ebn = (16, 32) if _INTERPRET else (32, 128)
        _cost_split_epilogue_kernel[(_cdiv(rows_max, ebm), _cdiv(cols_max, ebn), n_seg)](
            part, s, t, p, q, inv_s, inv_t, out, seg, n_pad, m_pad, d, split, c_total,
            *s_strides, *t_strides, *p_strides, *q_strides, c_sb, ldc, *consts, PADDED=padded, BM=ebm, BN=ebn,
            num_warps=4,
        )


class _Sinkhorn:
    """Buffers and launches of one Sinkhorn solve over a set of segments (base-2 potentials).

    ``slab_rows``: rows per row-pass launch whose column partials are kept at once (all rows for
    a stored K; a streamed slab otherwise, its partials folded into a running (max, sum)).
    """

    def __init__(self, device, seg, *, padded, n_pad, m_pad, n_seg, n_max, m_max, rows_total, cols_total,
                 eps, tol, tau_a, tau_b=math.inf, la=None, lb=None, score=None, bm=None, slab_rows=None):
        self.seg, self.padded, self.n_pad, self.m_pad, self.n_seg = seg, padded, n_pad, m_pad, n_seg
        self.kappa_a, self.kappa_b = relaxation(tau_a, eps), relaxation(tau_b, eps)
        self.rho_a = 0.0 if math.isinf(tau_a) else eps / tau_a
        self.n_max, self.m_max, self.m_total, self.tol = n_max, m_max, cols_total, tol
        self.bm, self.bn, self.one_chunk, self.warps = _row_config(n_max, m_max, n_seg)
        if bm is not None:
            self.bm = bm
        self.blocks = _cdiv(slab_rows or n_max, self.bm)
        self.streamed = slab_rows is not None and slab_rows < n_max
        self.f = _empty(rows_total, torch.float32, device)
        self.g = _empty(cols_total, torch.float32, device)
        self.fn = _empty(rows_total, torch.float32, device) if tol > 0 else self.f
        self.pmax = _empty(self.blocks * cols_total, torch.float32, device)
        self.psum = _empty(self.blocks * cols_total, torch.float32, device)
        self.amax = _empty(cols_total, torch.float32, device) if self.streamed else self.g
        self.asum = _empty(cols_total, torch.float32, device) if self.streamed else self.g
        self.vpart = _empty(_cdiv(n_max, self.bm) * n_seg, torch.float32, device) if tol > 0 else self.f
        self.done = _empty(n_seg, torch.int32, device) if tol > 0 else self.f
        self.la, self.lb = la, lb
        self.score = score

    @staticmethod
    def partial_bytes(n_max, m_max, n_seg, cols_total):
        return 2 * 4 * _cdiv(n_max, _row_block(n_max, m_max, n_seg)) * cols_total

    def row_pass(self, k, k_scale, t, *, final=False, row_lo=0, row_hi=None, c_row0=0):
        """Row pass of iteration t (1-based) over rows [row_lo, row_hi) of every segment;
        ``final`` is the scoring pass after the last iteration."""
        has_tol = self.tol > 0
        row_hi = self.n_max if row_hi is None else row_hi
        grid = (_cdiv(row_hi - row_lo, self.bm), self.n_seg)
        _sinkhorn_row_kernel[grid](
            k, self.seg, self.n_pad, self.m_pad, row_lo, row_hi, c_row0, k_scale, self.kappa_a, self.rho_a,
            self.f, self.fn, self.g, self.la if self.la is not None else self.f,
            self.pmax, self.psum, self.vpart, self.score if self.score is not None else self.f, self.done,
            self.m_total, self.n_seg,
            PADDED=self.padded, FIRST=t == 1, HAS_TOL=has_tol, CHECK=has_tol and t >= 2 and not final,
            PARTIALS=not final, SCORE=self.score is not None and (final or (has_tol and t >= 2)),
            HAS_LA=self.la is not None, BM=self.bm, BN=self.bn, ONE_CHUNK=self.one_chunk, num_warps=self.warps,
        )

    def merge(self, t, *, rows=None, first_slab=True, last_slab=True):
        """Column update of iteration t from the partials of ``rows`` rows (default: all); a
        streamed pass folds each slab (not last_slab) and merges at its last slab."""
        has_tol = self.tol > 0
        rows = self.n_max if rows is None else rows
        grid = (_cdiv(max(self.n_max, self.m_max), _MERGE_BLOCK), self.n_seg)
        _sinkhorn_merge_kernel[grid](
            self.pmax, self.psum, self.vpart, self.f, self.fn, self.g,
            self.lb if self.lb is not None else self.g, self.done, self.seg, self.amax, self.asum,
            self.n_pad, self.m_pad, self.m_total, self.n_seg, self.bm, _cdiv(rows, self.bm), float(self.tol),
            self.kappa_b,
            PADDED=self.padded, FIRST=t == 1, HAS_TOL=has_tol, CHECK=has_tol and t >= 2,
            HAS_LB=self.lb is not None, ACC_IN=not first_slab, ACC_OUT=not last_slab,
            BLOCK=_MERGE_BLOCK, RB=_MERGE_RB, VBLOCK=32, num_warps=4,
        )


# --------------------------------------------------------------------------------------------
# public launchers (called by topv.ops)
# --------------------------------------------------------------------------------------------


def cost_matrix(s, t, p, q, alpha, beta, gamma, sigma):
    """C (B, n, m) float32 from s (B, n, d), t (B, m, d), p (B, n, 2), q (B, m, 2) (any strides)."""
    B, n, d = s.shape
    m = t.shape[1]
    dev = s.device
    inv_s = _empty(B * n, torch.float32, dev)
    inv_t = _empty(B * m, torch.float32, dev)
    _inv_norms(s, inv_s, t, inv_t, False, None, None)
    out = _empty((B, n, m), torch.float32, dev)
    _launch_cost(
        s, t, p, q, inv_s, inv_t, out, out, padded=True, n_pad=n, m_pad=m, n_seg=B, d=d, row_lo=0, row_hi=n,
        c_row0=0, s_strides=s.stride(), t_strides=t.stride(), p_strides=p.stride(), q_strides=q.stride(),
        c_sb=n * m, ldc=m, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, out_scale=1.0,
        rows_max=n, cols_max=m, c_total=B * n * m)
    return out


def sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b):
    """Potentials (f (B, n), g (B, m)) float32 of log-domain Sinkhorn on C (B, n, m) contiguous."""
    B, n, m = C.shape
    sk = _Sinkhorn(C.device, C, padded=True, n_pad=n, m_pad=m, n_seg=B, n_max=n, m_max=m, rows_total=B * n,
                   cols_total=B * m, eps=eps, tol=tol, tau_a=tau_a, tau_b=tau_b, la=log_a, lb=log_b)
    for it in range(1, n_iters + 1):
        sk.row_pass(C, LOG2E / eps, it)
        sk.merge(it)
    to_nat = eps / LOG2E
    return (sk.f * to_nat).view(B, n), (sk.g * to_nat).view(B, m)


def _select_table(segs, device, recover_ratio):
    def build(sg, dev):
        rows, c_off = [], 0
        for r0, n, k, o in zip(sg.starts, sg.lens, sg.keep, sg.out_starts):
            k_rec = math.floor(recover_ratio * k)
            rows.append((r0, n, r0, n, c_off, k - k_rec, k_rec, o))
            c_off += n * n
        return torch.tensor(rows, dtype=torch.int64, device=dev)
    return segs.cached(device, f"triton_table_rr{recover_ratio!r}", build)


def workspace_cap(device: torch.device, max_workspace: int | None) -> int:
    """Bytes a prune call may take for K (fp32, all segments or one streamed slab) and the Sinkhorn
    column partials (the small per-token buffers come on top): ``max_workspace`` if given, else
    TOPV_COST_BUFFER_CAP_BYTES, else a share of the device's free memory with a floor
    (topv.defaults). The CUDA backend applies the same rule (csrc/topv_api.cu)."""
    if max_workspace is not None:
        return max_workspace
    env = os.environ.get("TOPV_COST_BUFFER_CAP_BYTES")
    if env:
        return max(int(env), 4)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return max(D.WORKSPACE_FLOOR_BYTES, int(D.WORKSPACE_FREE_FRACTION * free))


def _plan(segs, cap):
    """(n_max, elements of every segment's K, whether they and the partials fit in cap bytes)."""
    n_max, k_elems = max(segs.lens), sum(n * n for n in segs.lens)
    T = sum(segs.lens)
    return n_max, k_elems, 4 * k_elems + _Sinkhorn.partial_bytes(n_max, n_max, segs.count, T) <= cap


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """(T, d) with unit stride on d: a view when the layout allows, else one copy."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def prune(source, target, pos, segs, params, check_finite, max_workspace=None):
    """TopV (the launcher contract of topv/_reference.py). Returns (kept, scores, bad)."""
    src, tgt = _packed_rows(source), _packed_rows(target)
    if pos.dim() == 3:
        pos = pos.reshape(-1, 2)
    kept, scores, bad = _prune_packed(src, tgt, pos, segs, params, check_finite,
                                      workspace_cap(src.device, max_workspace))
    if source.dim() == 3:
        kept, scores = kept.view(segs.count, segs.keep[0]), scores.view(source.shape[:2])
    return kept, scores, bad


def _prune_packed(src, tgt, pos, segs, params, check_finite, cap):
    dev = src.device
    T, d = src.shape
    S = segs.count
    padded = segs.padded
    n_pad = segs.lens[0]
    pos_shared = padded and pos.shape[0] != T
    bad = torch.zeros(1, dtype=torch.int32, device=dev) if check_finite else None
    inv_s = _empty(T, torch.float32, dev)
    inv_t = _empty(T, torch.float32, dev)
    _inv_norms(src[None], inv_s, tgt[None], inv_t, check_finite, pos, bad)
    scores = _empty(T, torch.float32, dev)
    table = _select_table(segs, dev, params.recover_ratio)
    k_scale = LOG2E / params.eps
    cost_kw = dict(alpha=params.alpha, beta=params.beta, gamma=params.gamma, sigma=params.sigma, out_scale=k_scale)
    # positions: packed rows (T, 2), or the shared (n, 2) of a padded batch (batch stride 0)
    p_strides = (0 if pos_shared else n_pad * 2, 2, 1)

    n_max, k_elems, stored = _plan(segs, cap)
    if stored:
        k = _empty(k_elems, torch.float32, dev)
        _launch_cost(
            src, tgt, pos, pos, inv_s, inv_t, k, table, padded=padded, n_pad=n_pad, m_pad=n_pad, n_seg=S, d=d,
            row_lo=0, row_hi=n_max, c_row0=0, s_strides=(n_pad * src.stride(0), src.stride(0), 1),
            t_strides=(n_pad * tgt.stride(0), tgt.stride(0), 1), p_strides=p_strides, q_strides=p_strides,
            c_sb=n_pad * n_pad, ldc=n_pad, rows_max=n_max, cols_max=n_max, c_total=k.numel(), **cost_kw)
        sk = _Sinkhorn(dev, table, padded=padded, n_pad=n_pad, m_pad=n_pad, n_seg=S, n_max=n_max, m_max=n_max,
                       rows_total=T, cols_total=T, eps=params.eps, tol=params.tol, tau_a=params.tau, score=scores)
        for it in range(1, params.n_iters + 1):
            sk.row_pass(k, 1.0, it)
            sk.merge(it)
        sk.row_pass(k, 1.0, params.n_iters + 1, final=True)
    else:
        for r0, n in zip(segs.starts, segs.lens):
            p_seg = pos[:n] if pos_shared else pos[r0:r0 + n]
            _prune_one_streamed(src[r0:r0 + n], tgt[r0:r0 + n], p_seg, inv_s[r0:r0 + n], inv_t[r0:r0 + n],
                                scores[r0:r0 + n], params, cost_kw, cap)

    kept = select(scores, segs, params.recover_ratio)
    return kept, scores, bad


def select(scores, segs, recover_ratio):
    """Kept indices (sum(keep),) int64 of the TopV selection on scores (T,) float32 (steps 1-3 of
    docs/algorithm.md): local to each segment for a padded layout, global for a packed one."""
    dev = scores.device
    T = scores.shape[0]
    S = segs.count
    n_pad, n_max = segs.lens[0], max(segs.lens)
    table = _select_table(segs, dev, recover_ratio)
    k0 = segs.keep[0]
    k_rec0 = math.floor(recover_ratio * k0)
    flags = _empty(T, torch.int32, dev)
    # 16 rows per program: at n=16384, 64 rows (a 64x128 int32 count tile) took 414 us on the H100
    bm = 16
    _top_flag_kernel[(_cdiv(n_max, bm), S)](
        scores, flags, table, n_pad, k0 - k_rec0, PADDED=segs.padded, BM=bm, BN=32 if _INTERPRET else 128,
        num_warps=4)
    kept = _empty(segs.total_keep, torch.int64, dev)
    _compact_kernel[(S,)](
        flags, kept, table, n_pad, k0 - k_rec0, k_rec0, k0, PADDED=segs.padded, LOCAL=segs.padded,
        BLOCK=32 if _INTERPRET else 1024, num_warps=4)
    return kept


def _prune_one_streamed(src, tgt, pos, inv_s, inv_t, scores, params, cost_kw, cap):
    """Sinkhorn + scores of one segment whose K is computed slab by slab (rows [lo, hi)).

    The slab and its column partials fit in cap bytes; slabs are equal (multiples of the row
    block) and visited in serpentine order, so each pass after the first reuses the slab left
    by the previous one instead of recomputing its GEMM.
    """
    dev = src.device
    n, d = src.shape
    bm = _row_block(n, n, 1)
    per_row = 4 * n + 2 * 4 * n / bm  # K row + its share of the column partials
    slab_max = max(bm, int(cap // per_row) // bm * bm)
    n_slabs = _cdiv(n, slab_max)
    slab = _cdiv(_cdiv(n, n_slabs), bm) * bm
    sk = _Sinkhorn(dev, scores, padded=True, n_pad=n, m_pad=n, n_seg=1, n_max=n, m_max=n, rows_total=n,
                   cols_total=n, eps=params.eps, tol=params.tol, tau_a=params.tau, score=scores, bm=bm, slab_rows=slab)
    work = _empty(min(slab, n) * n, torch.float32, dev)
    bounds = [(lo, min(lo + slab, n)) for lo in range(0, n, slab)]
    resident = None
    for it in range(1, params.n_iters + 2):
        final = it == params.n_iters + 1
        order = bounds if it % 2 else bounds[::-1]
        for idx, (lo, hi) in enumerate(order):
            if resident != lo:
                _launch_cost(
                    src, tgt, pos, pos, inv_s, inv_t, work, scores, padded=True, n_pad=n, m_pad=n, n_seg=1, d=d,
                    row_lo=lo, row_hi=hi, c_row0=lo, s_strides=(0, src.stride(0), 1), t_strides=(0, tgt.stride(0), 1),
                    p_strides=(0, 2, 1), q_strides=(0, 2, 1), c_sb=0, ldc=n, rows_max=hi - lo, cols_max=n,
                    **cost_kw)
                resident = lo
            sk.row_pass(work, 1.0, it, final=final, row_lo=lo, row_hi=hi, c_row0=lo)
            if not final:
                sk.merge(it, rows=hi - lo, first_slab=idx == 0, last_slab=idx == len(order) - 1)
