"""Segment addressing shared by the topv Triton kernels (only @triton.jit code)."""

import triton
import triton.language as tl

# Columns of the int64 segment table built by topv._triton (one row per segment).
SEG_COLS = tl.constexpr(8)  # row0, n, col0, m, c_off, k_top, k_rec, out0


@triton.jit
def _segment(seg_ptr, z, n_pad, m_pad, PADDED: tl.constexpr):
    """(row0, n, col0, m, c_off) of segment ``z``, all int64.

    PADDED: every segment has n_pad rows and m_pad columns, laid out back to back (no table read).
    Otherwise the values come from row ``z`` of the int64 table at ``seg_ptr``.
    """
    if PADDED:
        zz = z.to(tl.int64)
        n = zz * 0 + n_pad
        m = zz * 0 + m_pad
        return zz * n_pad, n, zz * m_pad, m, zz * n_pad * m_pad
    else:
        base = seg_ptr + z * SEG_COLS
        return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)
