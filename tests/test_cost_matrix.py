"""topv.cost_matrix on every backend against the float64 oracle."""

import pytest
import torch
from conftest import backend_cases
from oracle import features

import topv
from topv import reference


def _shapes(device):
    # (B or None, n, m, d)
    if device == "cpu":
        # (1, 61, 97, 131): the C++ bf16 GEMM's odd d (a padded last pair) and partial row / column tiles.
        return [(None, 1, 1, 8), (2, 7, 5, 16), (1, 19, 33, 24), (1, 61, 97, 131)]
    return [(None, 577, 577, 4096), (3, 576, 100, 1024), (2, 1, 7, 64), (1, 2880, 2880, 256)]


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cost_matrix_matches_oracle(backend, device, dtype):
    gen = torch.Generator().manual_seed(20)
    for B, n, m, d in _shapes(device):
        lead = () if B is None else (B,)
        s = features((*lead, n, d), dtype, device, gen, contiguous=(n % 2 == 0))
        t = features((*lead, m, d), dtype, device, gen)
        if m > 1:
            t[..., 0, :] = 0  # a zero-norm token: cos = 0 with everything
        p, q = torch.rand(n, 2, generator=gen).to(device), torch.rand(*lead, m, 2, generator=gen).to(device)
        C = topv.cost_matrix(s, t, p, q, alpha=1.5, beta=0.7, gamma=0.3, sigma=0.15, backend=backend)
        assert C.dtype == torch.float32 and C.shape == (*lead, n, m)
        pb = p.expand(*lead, n, 2) if B is not None else p
        want = reference.cost_matrix(*(x.double().cpu() for x in (s, t, pb, q)), alpha=1.5, beta=0.7, gamma=0.3,
                                     sigma=0.15)
        # fp32 dot products over d terms in another order: ~1e-6 relative.
        torch.testing.assert_close(C.double().cpu(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_cost_matrix_default_target_positions(backend, device):
    gen = torch.Generator().manual_seed(21)
    s, t = features((9, 8), torch.float32, device, gen), features((9, 8), torch.float32, device, gen)
    p = torch.rand(9, 2, generator=gen).to(device)
    torch.testing.assert_close(topv.cost_matrix(s, t, p, backend=backend), topv.cost_matrix(s, t, p, p, backend=backend))


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cosine_is_safe_at_every_finite_magnitude(backend, device, dtype):
    """Rows scaled by powers of two (exact) have the same cosines: squares of |x| ~ 1e21 overflow
    float32 and squares of |x| ~ 1e-21 underflow it, and no finite input may give NaN. Rows of
    every kind in one call: huge, tiny, zero and ordinary, sources and targets."""
    gen = torch.Generator().manual_seed(22)
    B, n, m, d = (1, 19, 23, 40) if device == "cpu" else (2, 577, 300, 1024)
    s, t = features((B, n, d), dtype, device, gen), features((B, m, d), dtype, device, gen)
    p, q = torch.rand(B, n, 2, generator=gen).to(device), torch.rand(B, m, 2, generator=gen).to(device)
    want = topv.cost_matrix(s, t, p, q, backend=backend)
    row_exp = torch.tensor([70, -70, 0, 100, -100, 0, 0], dtype=dtype)
    s_scale = torch.ldexp(torch.ones(n, dtype=dtype), row_exp.repeat(n)[:n].to(torch.int32)).to(device)
    t_scale = torch.ldexp(torch.ones(m, dtype=dtype), row_exp.roll(2).repeat(m)[:m].to(torch.int32)).to(device)
    s2, t2 = s * s_scale[:, None], t * t_scale[:, None]
    assert torch.isfinite(s2).all() and torch.isfinite(t2).all()
    got = topv.cost_matrix(s2, t2, p, q, backend=backend)
    assert torch.isfinite(got).all(), "a finite input gave a non-finite cost"
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=2e-5, rtol=0)
    # a zero row: cos = 0 with everything
    s2[:, 4] = 0
    got = topv.cost_matrix(s2, t2, p, q, backend=backend)
    ref = reference.cost_matrix(s2.double().cpu(), t2.double().cpu(), p.double().cpu(), q.double().cpu())
    torch.testing.assert_close(got.double().cpu(), ref, atol=2e-5, rtol=0)
    # and the scores of a prune of such rows are finite and those of the unscaled rows
    k = n // 3
    _, sc = topv.prune(s2, s2.flip(1), p, k, backend=backend)
    _, sc_ref = topv.prune(s2.cpu(), s2.flip(1).cpu(), p.cpu(), k, backend="reference")
    assert torch.isfinite(sc).all()
    torch.testing.assert_close(sc.double().cpu(), sc_ref.double(), atol=2e-4, rtol=0)
