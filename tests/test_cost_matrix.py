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
