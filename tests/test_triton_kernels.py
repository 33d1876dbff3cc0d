"""Kernel-level tests of the Triton backend (topv._triton launchers) against the float64 reference.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py) with small shapes.
Every buffer the launchers allocate is poisoned (NaN / -1) so an element a kernel forgets to
write shows up.
"""

import math
import os

import pytest
import torch

import topv
from topv import defaults, reference
from topv.ops import PruneParams, Segments

_CPU_OK = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _CPU_OK, reason="CPU Triton needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = defaults.PRUNE
COST = (defaults.ALPHA, defaults.BETA, defaults.GAMMA, defaults.SIGMA)  # the reference's defaults, positionally


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Make every launcher allocation start as NaN (floats) or -1 (integers)."""
    pytest.importorskip("triton")
    from topv import _triton

    def empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape if isinstance(shape, (tuple, list)) else (shape,), fill, dtype=dtype, device=device)

    monkeypatch.setattr(_triton, "_empty", empty)
    return _triton


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _feat(shape, dtype, device, gen, contiguous=True):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = (x + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
    if not contiguous:  # same values, row stride d + 3
        wide = torch.full((*shape[:-1], shape[-1] + 3), float("nan"), dtype=dtype)
        wide[..., 2:2 + shape[-1]] = x
        x = wide[..., 2:2 + shape[-1]]
    return x.to(device)


def _params(**over):
    return PruneParams(**{**PARAMS, **over})


def _big(device, cpu, gpu):
    return gpu if device == "cuda" else cpu


# --------------------------------------------------------------------------------------------
# cost matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cost_matrix_kernel(poisoned, device, dtype):
    gen = _gen(1)
    shapes = _big(device, [(1, 1, 1, 8), (2, 7, 5, 19), (1, 17, 33, 40)],
                  [(1, 1, 1, 64), (2, 7, 5, 19), (1, 577, 577, 1024), (3, 130, 64, 4096)])
    for B, n, m, d in shapes:
        s, t = _feat((B, n, d), dtype, device, gen), _feat((B, m, d), dtype, device, gen)
        p = torch.rand(n, 2, generator=gen).to(device).expand(B, n, 2)  # batch stride 0
        q = torch.rand(B, m, 2, generator=gen).to(device)
        s[0, 0] = 0  # a zero-norm row: cos = 0 with everything
        got = poisoned.cost_matrix(s, t, p, q, 0.7, 1.3, 0.4, 0.3)
        want = reference.cost_matrix(s.double(), t.double(), p.double(), q.double(), alpha=0.7, beta=1.3, gamma=0.4,
                                     sigma=0.3)
        assert got.dtype == torch.float32 and got.shape == (B, n, m)
        torch.testing.assert_close(got.double(), want, atol=2e-6 * max(1, math.sqrt(d) / 8), rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [2, 3])
def test_cost_matrix_kernel_split_k(poisoned, device, split, monkeypatch):
    """Split-K (raw partial dot products + a separate epilogue) for GEMMs with few tiles."""
    monkeypatch.setattr(poisoned, "_split_k", lambda tiles, d, dtype: split)
    gen = _gen(12)
    for B, n, m, d in _big(device, [(2, 7, 5, 70), (1, 17, 33, 100)], [(1, 577, 577, 4096), (2, 7, 5, 1000)]):
        s, t = _feat((B, n, d), torch.bfloat16, device, gen), _feat((B, m, d), torch.bfloat16, device, gen)
        p, q = torch.rand(B, n, 2, generator=gen).to(device), torch.rand(B, m, 2, generator=gen).to(device)
        got = poisoned.cost_matrix(s, t, p, q, *COST)
        want = reference.cost_matrix(s.double(), t.double(), p.double(), q.double())
        torch.testing.assert_close(got.double(), want, atol=2e-6 * max(1, math.sqrt(d) / 8), rtol=0)
    lens, keep = [5, 1, 17], [2, 1, 9]
    T = sum(lens)
    src, tgt = _feat((T, 70), torch.bfloat16, device, gen), _feat((T, 70), torch.bfloat16, device, gen)
    pos = torch.rand(T, 2, generator=gen).to(device)
    segs = Segments.of(tuple(lens), tuple(keep), False)
    kept, scores, _ = poisoned.prune(src, tgt, pos, segs, _params(), False)
    wk, ws = _oracle(src, tgt, pos, lens, keep, False)
    _check_prune(kept, scores, lens, keep, False, wk, ws, 0.25, 2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_cost_matrix_kernel_noncontiguous(poisoned, device):
    gen = _gen(2)
    B, n, m, d = 2, 9, 6, 24
    s = _feat((B, d, n), torch.float32, device, gen).transpose(1, 2)  # stride 1 on n, not on d
    t = _feat((B, m, d), torch.float32, device, gen, contiguous=False)
    p = torch.rand(B, 2, n, generator=gen).to(device).transpose(1, 2)  # column stride n
    got = poisoned.cost_matrix(s, t, p, p[:, :m], *COST)
    want = reference.cost_matrix(s.double(), t.double(), p.double(), p[:, :m].double())
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# sinkhorn
# --------------------------------------------------------------------------------------------


def _cost(B, n, m, device, gen, scale=1.0):
    s, t = _feat((B, n, 16), torch.float64, "cpu", gen), _feat((B, m, 16), torch.float64, "cpu", gen)
    p, q = torch.rand(B, n, 2, generator=gen, dtype=torch.float64), torch.rand(B, m, 2, generator=gen, dtype=torch.float64)
    return (scale * reference.cost_matrix(s, t, p, q)).float().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("marginals", [False, True])
def test_sinkhorn_kernel(poisoned, device, marginals):
    gen = _gen(3)
    for B, n, m in _big(device, [(1, 1, 1), (2, 7, 5), (1, 19, 40)], [(1, 1, 1), (2, 7, 5), (1, 577, 300), (4, 576, 576)]):
        C = _cost(B, n, m, device, gen)
        a = b = None
        if marginals:
            a = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.1
            b = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.1
            a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
        f, g = poisoned.sinkhorn(C, None if a is None else a.log().float().to(device),
                                 None if b is None else b.log().float().to(device), 0.1, 4, 0.0, 0.3, math.inf)
        fr, gr = reference.sinkhorn(C.double().cpu(), a, b, eps=0.1, n_iters=4, tau_a=0.3)
        torch.testing.assert_close(f.double().cpu(), fr, atol=2e-5, rtol=0)
        torch.testing.assert_close(g.double().cpu(), gr, atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_kernel_tol_exits_per_segment(poisoned, device):
    """Segments with differently scaled costs converge at different iterations; each keeps the
    potentials of the iteration where it converged, the others go on."""
    gen = _gen(4)
    n, m = _big(device, (13, 11), (577, 300))
    C = torch.cat([_cost(1, n, m, device, gen, scale) for scale in (0.02, 0.2, 0.5, 3.0)])
    n_iters, tol = 30, 1e-3
    f, g = poisoned.sinkhorn(C, None, None, 0.1, n_iters, tol, math.inf, math.inf)
    fr, gr = reference.sinkhorn(C.double().cpu(), eps=0.1, n_iters=n_iters, tol=tol)
    torch.testing.assert_close(f.double().cpu(), fr, atol=5e-5, rtol=0)
    torch.testing.assert_close(g.double().cpu(), gr, atol=5e-5, rtol=0)
    # the exit iterations differ: compare with a fixed number of iterations per segment
    exits = []
    for b in range(C.shape[0]):
        for it in range(1, n_iters + 1):
            fi, _ = reference.sinkhorn(C[b:b + 1].double().cpu(), eps=0.1, n_iters=it)
            if torch.equal(fi, fr[b:b + 1]):
                exits.append(it)
                break
        else:
            exits.append(None)
    assert len(set(exits)) >= 3, f"segments should stop at different iterations, got {exits}"


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_select_kernel_ties_nan_inf(poisoned, device):
    gen = _gen(5)
    lens = _big(device, [5, 1, 17, 33], [5, 1, 17, 577, 2000])
    for rr in (0.0, 0.25, 0.6):
        keep = [max(1, (n * (i + 1)) // 5) for i, n in enumerate(lens)]
        keep[0] = lens[0]  # keep everything in one segment
        T = sum(lens)
        sc = torch.randint(0, 4, (T,), generator=gen).float()  # many exact ties
        sc[torch.rand(T, generator=gen) < 0.1] = float("nan")
        sc[torch.rand(T, generator=gen) < 0.05] = float("inf")
        sc[torch.rand(T, generator=gen) < 0.05] = float("-inf")
        segs = Segments.of(tuple(lens), tuple(keep), False)
        got = poisoned.select(sc.to(device), segs, rr).cpu()
        want, start = [], 0
        for n, k in zip(lens, keep):
            want.append(reference.select(sc[None, start:start + n], k, rr)[0] + start)
            start += n
        assert torch.equal(got, torch.cat(want)), (rr, got, torch.cat(want))
        # padded layout: local indices
        n = lens[-1]
        sc2 = sc[:3 * n] if sc.numel() >= 3 * n else sc[:n].repeat(3)
        segs = Segments.of((n,) * 3, (keep[-1],) * 3, True)
        got = poisoned.select(sc2.to(device), segs, rr).cpu().view(3, -1)
        assert torch.equal(got, reference.select(sc2.view(3, n), keep[-1], rr))


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _oracle(src, tgt, pos, lens, keep, padded, **over):
    kw = {**PARAMS, **over}
    s, t, p = src.double().cpu(), tgt.double().cpu(), pos.double().cpu()
    if padded:
        B, n = len(lens), lens[0]
        p = p.view(-1, n, 2).expand(B, n, 2)
        kept, sc = reference.prune_padded(s.view(B, n, -1), t.view(B, n, -1), p, keep[0], **kw)
        return list(kept), sc.reshape(-1)
    kept, sc = reference.prune_packed(s, t, p, lens, keep, **kw)
    out, start, first = [], 0, 0
    for n, k in zip(lens, keep):
        out.append(kept[first:first + k] - start)
        start, first = start + n, first + k
    return out, sc


def _check_prune(kept, scores, lens, keep, padded, want_kept, want_scores, rr, atol):
    scores = scores.double().cpu()
    assert not torch.isnan(scores).any()
    torch.testing.assert_close(scores, want_scores, atol=atol, rtol=0)
    kept = kept.cpu()
    start, first = 0, 0
    for s, (n, k) in enumerate(zip(lens, keep)):
        mine = kept[first:first + k] - (0 if padded else start)
        assert mine.numel() == k and bool((mine >= 0).all() & (mine < n).all())
        assert bool((mine[1:] > mine[:-1]).all())
        # exactly the selection of our own scores, and the oracle's set up to ties within atol
        assert torch.equal(mine, reference.select(scores[None, start:start + n], k, rr)[0])
        o = want_scores[start:start + n]
        diff = set(mine.tolist()) ^ set(want_kept[s].tolist())
        if diff:
            k_top = k - math.floor(rr * k)
            boundary = torch.sort(o, descending=True).values[k_top - 1]
            near = [i for i in diff if abs(o[i] - boundary) > 2 * atol]
            # recovery picks shift when a top tie flips; allow that only when some top token is tied
            top_diff = set(reference.select(scores[None, start:start + n], k_top, 0)[0].tolist()) ^ set(
                reference.select(o[None], k_top, 0)[0].tolist())
            assert top_diff and all(abs(o[i] - boundary) <= 2 * atol for i in top_diff), (s, diff, near)
        start, first = start + n, first + k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_kernel_packed_ragged(poisoned, device, dtype):
    gen = _gen(6)
    lens = _big(device, [5, 1, 17], [577, 1, 7, 300])
    keep = _big(device, [2, 1, 9], [144, 1, 3, 75])
    d = _big(device, 24, 1024)
    T = sum(lens)
    src = _feat((T, d), dtype, device, gen, contiguous=False)  # row stride d + 3
    tgt = _feat((T, d), dtype, device, gen)
    pos = torch.rand(T, 2, generator=gen).to(device)
    segs = Segments.of(tuple(lens), tuple(keep), False)
    kept, scores, bad = poisoned.prune(src, tgt, pos, segs, _params(), True)
    assert int(bad.max()) == 0
    wk, ws = _oracle(src, tgt, pos, lens, keep, False)
    _check_prune(kept, scores, lens, keep, False, wk, ws, 0.25, 2e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_pos", [True, False])
def test_prune_kernel_padded(poisoned, device, shared_pos):
    gen = _gen(7)
    B, n, d, k = _big(device, (3, 7, 16, 3), (3, 577, 512, 144))
    src = _feat((B * n, d), torch.bfloat16, device, gen)
    tgt = _feat((B * n, d), torch.bfloat16, device, gen)
    pos = torch.rand(n if shared_pos else B * n, 2, generator=gen).to(device)
    segs = Segments.of((n,) * B, (k,) * B, True)
    kept, scores, bad = poisoned.prune(src, tgt, pos, segs, _params(), False)
    assert bad is None
    wk, ws = _oracle(src, tgt, pos, [n] * B, [k] * B, True)
    _check_prune(kept, scores, [n] * B, [k] * B, True, wk, ws, 0.25, 2e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("streamed", [False, True])
def test_prune_kernel_tol_per_segment(poisoned, device, streamed):
    """tol > 0: segments (scaled features change the cost's contrast) stop at different iterations."""
    gen = _gen(8)
    lens = _big(device, [9, 1, 21, 14], [577, 1, 300, 400])
    keep = [max(1, n // 3) for n in lens]
    d = 16
    T = sum(lens)
    src = _feat((T, d), torch.float32, device, gen)
    tgt = _feat((T, d), torch.float32, device, gen)
    pos = torch.rand(T, 2, generator=gen).to(device)
    over = dict(n_iters=12, tol=2e-3, beta=0.05, alpha=0.5)
    cap = 4 * 16 * max(lens) + 4 if streamed else None  # K of each segment in slabs of a few row blocks
    segs = Segments.of(tuple(lens), tuple(keep), False)
    kept, scores, _ = poisoned.prune(src, tgt, pos, segs, _params(**over), False, cap)
    wk, ws = _oracle(src, tgt, pos, lens, keep, False, **over)
    _check_prune(kept, scores, lens, keep, False, wk, ws, 0.25, 2e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_kernel_streamed_matches_stored(poisoned, device):
    """The slab-streamed path (K recomputed per slab every pass) gives the stored path's result."""
    gen = _gen(9)
    B, n, d = _big(device, (2, 37, 24), (1, 2049, 512))
    src = _feat((B * n, d), torch.bfloat16, device, gen)
    tgt = _feat((B * n, d), torch.bfloat16, device, gen)
    pos = torch.rand(n, 2, generator=gen).to(device)
    segs = Segments.of((n,) * B, (n // 4,) * B, True)
    k1, s1, _ = poisoned.prune(src, tgt, pos, segs, _params(), False)
    k2, s2, _ = poisoned.prune(src, tgt, pos, segs, _params(), False, 4 * n * 16 * 2 + 8)  # 2 row blocks per slab
    # the slabs' GEMM tiles (hence fp32 summation order) differ from the stored path's
    torch.testing.assert_close(s2, s1, atol=2e-5, rtol=0)
    wk, ws = _oracle(src, tgt, pos, [n] * B, [n // 4] * B, True)
    _check_prune(k2, s2, [n] * B, [n // 4] * B, True, wk, ws, 0.25, 2e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["src", "tgt", "pos"])
def test_prune_kernel_nonfinite(poisoned, device, where):
    gen = _gen(10)
    lens, keep, d = [6, 11], [3, 5], 16
    T = sum(lens)
    x = {"src": _feat((T, d), torch.float16, device, gen), "tgt": _feat((T, d), torch.float16, device, gen),
         "pos": torch.rand(T, 2, generator=gen).to(device)}
    x[where][8, 1] = float("nan")
    x[where][2, 0] = float("inf")
    segs = Segments.of(tuple(lens), tuple(keep), False)
    _, _, bad = poisoned.prune(x["src"], x["tgt"], x["pos"], segs, _params(), True)
    assert int(bad.max().item()) != 0
    kept, scores, bad = poisoned.prune(x["src"], x["tgt"], x["pos"], segs, _params(), False)
    assert bad is None and scores.shape == (T,)
    kept, start, first = kept.cpu(), 0, 0
    for n, k in zip(lens, keep):
        mine = kept[first:first + k]
        assert bool((mine >= start).all() & (mine < start + n).all()) and mine.unique().numel() == k
        start, first = start + n, first + k


@pytest.mark.parametrize("device", DEVICES)
def test_public_op_routes_to_triton(device):
    gen = _gen(11)
    src = _feat((2, 9, 16), torch.float32, device, gen)
    pos = topv.grid_positions(3, 3).to(device)
    kept, scores = topv.prune(src, src, pos, 4, backend="triton")
    wk, ws = reference.prune_padded(src.double().cpu(), src.double().cpu(), pos.double().cpu().expand(2, 9, 2), 4)
    torch.testing.assert_close(scores.double().cpu(), ws, atol=2e-4, rtol=0)
    assert kept.shape == (2, 4)
