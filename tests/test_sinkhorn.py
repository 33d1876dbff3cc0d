"""topv.sinkhorn on every backend against the float64 oracle, including marginals and tol."""

import math
import warnings

import pytest
import torch
from conftest import backend_cases
from oracle import oracle_stop

import topv
from topv import reference


def _shapes(device):
    if device == "cpu":
        return [(None, 1, 1), (2, 7, 5), (1, 19, 33)]
    return [(None, 577, 577), (16, 576, 576), (2, 1, 7), (1, 3328, 3328), (3, 100, 2049)]


def _gauge_fixed(f, g):
    # (f + c, g - c) is the same plan: compare potentials up to that constant.
    c = g[..., :1]
    return f + c, g - c


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("with_marginals", [False, True])
def test_sinkhorn_matches_oracle(backend, device, with_marginals):
    gen = torch.Generator().manual_seed(30)
    for B, n, m in _shapes(device):
        lead = () if B is None else (B,)
        C = torch.rand(*lead, n, m, generator=gen) * 2
        a = b = None
        if with_marginals:
            a = torch.rand(*lead, n, generator=gen) + 0.1
            b = torch.rand(m, generator=gen) + 0.1
            a, b = a / a.sum(-1, keepdim=True), b / b.sum()
        f, g = topv.sinkhorn(C.to(device), None if a is None else a.to(device), None if b is None else b.to(device),
                             eps=0.1, n_iters=4, backend=backend)
        assert f.shape == (*lead, n) and g.shape == (*lead, m) and f.dtype == g.dtype == torch.float32
        C3 = C.double().reshape(-1, n, m)
        fo, go = reference.sinkhorn(C3, None if a is None else a.double().reshape(-1, n),
                                    None if b is None else b.double(), eps=0.1, n_iters=4)
        f_, g_ = _gauge_fixed(f.double().cpu().reshape(-1, n), g.double().cpu().reshape(-1, m))
        fo, go = _gauge_fixed(fo, go)
        torch.testing.assert_close(f_, fo, atol=5e-5, rtol=0)
        torch.testing.assert_close(g_, go, atol=5e-5, rtol=0)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_sinkhorn_tol_stops_segments_independently(backend, device):
    gen = torch.Generator().manual_seed(31)
    n = 6 if device == "cpu" else 300
    C = torch.stack([torch.zeros(n, n), torch.rand(n, n, generator=gen) * 0.5, torch.rand(n, n, generator=gen) * 2])
    f, g = topv.sinkhorn(C.to(device), eps=0.1, n_iters=200, tol=1e-3, backend=backend)
    fo, go = reference.sinkhorn(C.double(), eps=0.1, n_iters=200, tol=1e-3)
    torch.testing.assert_close(f.double().cpu(), fo, atol=5e-5, rtol=0)
    torch.testing.assert_close(g.double().cpu(), go, atol=5e-5, rtol=0)


# (tau_a, tau_b): semi-relaxed either side, unbalanced, balanced
RELAXATIONS = [(0.1, math.inf), (0.5, 0.2), (math.inf, 0.3), (math.inf, math.inf)]


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("tau_a, tau_b", RELAXATIONS, ids=lambda t: f"{t}")
def test_sinkhorn_matches_pot_unbalanced(backend, device, tau_a, tau_b):
    """Every backend's plan after 1, 3 and 25 iterations equals POT's unbalanced Sinkhorn with the
    same KL weights (entropy reg_type, no stopping threshold), iteration for iteration."""
    ot = pytest.importorskip("ot")
    gen = torch.Generator().manual_seed(32)
    n, m, eps = (9, 13, 0.1) if device == "cpu" else (300, 257, 0.1)
    C = torch.rand(n, m, generator=gen, dtype=torch.float64) * 1.5
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=gen, dtype=torch.float64) + 0.2
    a, b = a / a.sum(), b / b.sum()
    for iters in (1, 3, 25):
        f, g = topv.sinkhorn(C.float().to(device), a.float().to(device), b.float().to(device), eps=eps, n_iters=iters,
                             tau_a=tau_a, tau_b=tau_b, backend=backend)
        P = torch.exp((f.double().cpu()[:, None] + g.double().cpu()[None, :] - C.float().double()) / eps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT says that reg_type="entropy" uses the all-ones reference
            P_pot = ot.unbalanced.sinkhorn_knopp_unbalanced(a.numpy(), b.numpy(), C.float().double().numpy(), eps,
                                                            (tau_a, tau_b), reg_type="entropy", numItermax=iters,
                                                            stopThr=0.0)
        torch.testing.assert_close(P * n * m, torch.as_tensor(P_pot) * n * m, atol=1e-4, rtol=2e-4)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("tau_a", [0.1, math.inf])
def test_sinkhorn_early_exit_matches_the_oracle_iteration(backend, device, tau_a):
    """tol > 0: each batch element stops after the same iteration as the oracle's rule (relaxed
    row violation below tol) and keeps that iteration's potentials."""
    gen = torch.Generator().manual_seed(33)
    n = 11 if device == "cpu" else 300
    C = torch.stack([torch.rand(n, n, generator=gen, dtype=torch.float64) * s for s in (0.05, 0.5, 2.0)])
    # A tolerance where consecutive iterates still differ by >= 5e-4 (float32 paths tell them apart).
    tol, n_iters = (1e-2 if math.isfinite(tau_a) else 3e-3), 60
    f, g = topv.sinkhorn(C.float().to(device), eps=0.1, n_iters=n_iters, tol=tol, tau_a=tau_a, backend=backend)
    Cf = C.float().double()
    stops = [oracle_stop(Cf[k:k + 1], 0.1, tol, n_iters, tau_a=tau_a) for k in range(3)]
    assert len(set(stops)) >= 2 and max(stops) < n_iters, stops  # different exits, all before the cap
    for k, t in enumerate(stops):
        fo, go = reference.sinkhorn(Cf[k:k + 1], eps=0.1, n_iters=t, tau_a=tau_a)
        torch.testing.assert_close(f[k].double().cpu(), fo[0], atol=5e-5, rtol=0)
        torch.testing.assert_close(g[k].double().cpu(), go[0], atol=5e-5, rtol=0)
        if t > 1:  # and not the iteration before (a later one is excluded by the first assert)
            fp, _ = reference.sinkhorn(Cf[k:k + 1], eps=0.1, n_iters=t - 1, tau_a=tau_a)
            assert (f[k].double().cpu() - fp[0]).abs().max() > 5e-5
