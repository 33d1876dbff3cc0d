"""topv.sinkhorn on every backend against the float64 oracle, including marginals and tol."""

import pytest
import torch
from conftest import backend_cases

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
