"""The reference against hand-checked cases and an independent solver (POT)."""

import math

import pytest
import torch

import topv
from topv import reference


def test_grid_positions_are_patch_centres_in_row_major_order():
    pos = topv.grid_positions(2, 3)
    expected = torch.tensor([[0.25, 1 / 6], [0.25, 0.5], [0.25, 5 / 6], [0.75, 1 / 6], [0.75, 0.5], [0.75, 5 / 6]])
    assert pos.dtype == torch.float32 and pos.shape == (6, 2)
    torch.testing.assert_close(pos, expected)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_grid_positions_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        topv.grid_positions(bad, 3)


def test_cost_matrix_hand_checked():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)  # last row: zero norm
    t = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]], dtype=torch.float64)
    p = torch.tensor([[[0.5, 0.5], [0.25, 0.5], [1.0, 1.0]]], dtype=torch.float64)
    C = reference.cost_matrix(s, t, p, alpha=2.0, beta=0.5, gamma=0.3, sigma=0.25)[0]
    r = math.sqrt(0.5)
    cos = [[1, 0, r], [0, 1, r], [0, 0, 0]]  # zero-norm source row: cos = 0 with everything
    pts = [(0.5, 0.5), (0.25, 0.5), (1.0, 1.0)]
    for i in range(3):
        for j in range(3):
            d2 = (pts[i][0] - pts[j][0]) ** 2 + (pts[i][1] - pts[j][1]) ** 2
            centre = math.hypot(pts[i][0] - 0.5, pts[i][1] - 0.5) / math.sqrt(0.5)
            want = 2.0 * (1 - cos[i][j]) / 2 + 0.5 * (1 - math.exp(-d2 / (2 * 0.25**2))) + 0.3 * centre
            assert C[i, j].item() == pytest.approx(want, abs=1e-12), (i, j)


def test_cost_terms_lie_in_unit_interval_times_weights():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 50, 8, generator=g), torch.randn(1, 50, 8, generator=g)
    p = torch.rand(1, 50, 2, generator=g)
    for kw in (dict(alpha=1, beta=0, gamma=0), dict(alpha=0, beta=1, gamma=0), dict(alpha=0, beta=0, gamma=1)):
        C = reference.cost_matrix(s, t, p, sigma=0.2, **kw)
        assert C.min() >= -1e-6 and C.max() <= 1 + 1e-6


def test_one_sinkhorn_iteration_by_hand():
    C = torch.tensor([[[0.0, 1.0], [2.0, 0.5]]], dtype=torch.float64)
    eps = 0.5
    f, g = reference.sinkhorn(C, eps=eps, n_iters=1)
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    f0 = [eps * math.log(0.5) - eps * lse([-C[0, i, j].item() / eps for j in range(2)]) for i in range(2)]
    g0 = [eps * math.log(0.5) - eps * lse([(f0[i] - C[0, i, j].item()) / eps for i in range(2)]) for j in range(2)]
    torch.testing.assert_close(f[0], torch.tensor(f0, dtype=torch.float64))
    torch.testing.assert_close(g[0], torch.tensor(g0, dtype=torch.float64))
    # The last update is on the target side: columns of the plan match b exactly.
    P = reference.plan(C, f, g, eps)[0]
    torch.testing.assert_close(P.sum(0), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_sinkhorn_converges_to_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(1)
    n, m, eps = 13, 9, 0.05
    C = torch.rand(1, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    f, gg = reference.sinkhorn(C, a, b, eps=eps, n_iters=5000)
    P = reference.plan(C, f, gg, eps)[0]
    P_pot = ot.sinkhorn(a.numpy(), b.numpy(), C[0].numpy(), eps, method="sinkhorn_log", numItermax=100000,
                        stopThr=1e-14)
    torch.testing.assert_close(P, torch.as_tensor(P_pot), atol=1e-10, rtol=1e-7)


def test_tol_stops_each_batch_element_independently():
    g = torch.Generator().manual_seed(2)
    easy = torch.zeros(1, 6, 6, dtype=torch.float64)  # uniform cost: the first plan is already exact
    hard = torch.rand(1, 6, 6, generator=g, dtype=torch.float64) * 0.5
    C = torch.cat([easy, hard])
    f, gg = reference.sinkhorn(C, eps=0.1, n_iters=300, tol=1e-4)
    f1, g1 = reference.sinkhorn(easy, eps=0.1, n_iters=1)
    torch.testing.assert_close(f[0], f1[0])  # frozen after iteration 1
    torch.testing.assert_close(gg[0], g1[0])
    # The hard element stops at the first iteration t whose plan meets tol, not before, not after.
    for t in range(1, 301):
        ft, gt = reference.sinkhorn(hard, eps=0.1, n_iters=t)
        if (reference.plan(hard, ft, gt, 0.1).sum(2) - 1 / 6).abs().sum() < 1e-4:
            break
    assert 1 < t < 300
    assert torch.equal(f[1], ft[0]) and torch.equal(gg[1], gt[0])


def test_tol_zero_runs_every_iteration():
    C = torch.rand(1, 5, 7, dtype=torch.float64)
    f, g = reference.sinkhorn(C, eps=0.1, n_iters=4, tol=0.0)
    f3, g3 = reference.sinkhorn(C, eps=0.1, n_iters=3)
    assert not torch.allclose(f, f3)


def test_scores_have_mean_one_and_depend_on_the_cost():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(2, 11, 11, generator=g, dtype=torch.float64)
    f, gg = reference.sinkhorn(C, eps=0.1, n_iters=3)
    s = reference.scores(C, f, gg, 0.1)
    torch.testing.assert_close(s.mean(1), torch.ones(2, dtype=torch.float64))
    assert s.std() > 1e-3  # row sums right after an f update would be exactly 1 everywhere


@pytest.mark.parametrize(
    "scores, keep, ratio, expected",
    [
        ([0.5, 2, 2, 1, 0.1, 3], 4, 0.25, [1, 2, 3, 5]),  # top {5, 1, 2}; rest [0, 3, 4] -> rest[1]
        ([1, 1, 1, 1], 2, 0.0, [0, 1]),  # ties go to the lower index
        ([1, 1, 1, 1, 1, 1, 1, 1], 4, 0.5, [0, 1, 3, 6]),  # top {0,1}; rest [2..7] -> rest[1], rest[4]
        ([float("nan"), 1, 2], 1, 0.0, [2]),  # NaN ranks below every number
        ([float("nan"), 1, 2], 3, 0.0, [0, 1, 2]),
        ([5, 4, 3, 2, 1, 0, -1, -2, -3, -4], 5, 0.8, [0, 2, 4, 6, 8]),  # k_rec=4: rest[1], [3], [5], [7]
        ([3.0], 1, 0.9, [0]),  # k_rec = floor(0.9) = 0
    ],
)
def test_select_hand_checked(scores, keep, ratio, expected):
    kept = reference.select(torch.tensor([scores], dtype=torch.float64), keep, ratio)
    assert kept.tolist() == [expected]


def test_select_is_exact_budget_sorted_and_unique():
    g = torch.Generator().manual_seed(4)
    for n in (1, 2, 7, 64):
        s = torch.rand(3, n, generator=g)
        for keep in {1, n // 2 or 1, n}:
            for ratio in (0.0, 0.25, 0.5, 0.99):
                kept = reference.select(s, keep, ratio)
                assert kept.shape == (3, keep)
                for row in kept:
                    assert row.unique().numel() == keep and torch.equal(row, row.sort().values)
                    assert 0 <= row.min() and row.max() < n


def test_a_per_source_cost_is_a_prior_on_the_source_mass():
    # Semi-relaxed OT (docs/algorithm.md): adding r_i to row i of C gives the same plan as the
    # marginal a_i exp(-r_i / tau) with C; so the centre term is a prior of strength gamma / tau.
    # With tau = inf the f potential absorbs r_i and nothing changes.
    g = torch.Generator().manual_seed(5)
    n, eps, tau = 30, 0.1, 0.1
    C = torch.rand(1, n, n, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for iters in (1, 3, 40):
        f1, g1 = reference.sinkhorn(C + r[:, None], eps=eps, n_iters=iters, tau_a=tau)
        f2, g2 = reference.sinkhorn(C, a * torch.exp(-r / tau), eps=eps, n_iters=iters, tau_a=tau)
        torch.testing.assert_close(reference.plan(C + r[:, None], f1, g1, eps), reference.plan(C, f2, g2, eps))
        f3, g3 = reference.sinkhorn(C + r[:, None], eps=eps, n_iters=iters)
        f4, g4 = reference.sinkhorn(C, eps=eps, n_iters=iters)
        torch.testing.assert_close(reference.plan(C + r[:, None], f3, g3, eps), reference.plan(C, f4, g4, eps))


def test_relaxation_factor():
    assert reference.relaxation(math.inf, 0.1) == 1.0
    assert reference.relaxation(0.1, 0.1) == 0.5
    assert reference.relaxation(0.3, 0.1) == pytest.approx(0.75)


def test_cost_matrix_is_scale_free_for_every_finite_magnitude():
    # float32: |x| ~ 1e19 squares to inf, |x| ~ 1e-25 to 0; the rows are scaled by powers of two first.
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    p = torch.rand(1, 9, 2, generator=g)
    want = reference.cost_matrix(s, t, p)
    for scale in (2.0**70, 2.0**-80, 2.0**120):
        got = reference.cost_matrix(s * scale, t, p)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    zero = s.clone()
    zero[0, 3] = 0
    assert torch.isfinite(reference.cost_matrix(zero, t, p)).all()


def test_prune_packed_equals_per_segment_padded():
    g = torch.Generator().manual_seed(6)
    lens, keep = [5, 1, 9], [2, 1, 4]
    src, tgt = torch.randn(15, 8, generator=g), torch.randn(15, 8, generator=g)
    pos = torch.rand(15, 2, generator=g)
    kept, scores = reference.prune_packed(src, tgt, pos, lens, keep)
    start, out = 0, 0
    for n, k in zip(lens, keep):
        ki, si = reference.prune_padded(src[None, start:start + n], tgt[None, start:start + n], pos[None, start:start + n], k)
        assert kept[out:out + k].tolist() == (ki[0] + start).tolist()
        torch.testing.assert_close(scores[start:start + n], si[0])
        start, out = start + n, out + k
