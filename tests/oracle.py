"""The float64 oracle and the comparisons every fast path is held to."""

from __future__ import annotations

import math

import torch

from topv import reference

# Scores have mean 1. A fast path computes the same float32 arithmetic in another order (and a
# tensor-core dot for fp16/bf16 features), so it lands within ~1e-5 of the float64 oracle; the
# amplification by 1/eps (= 10 by default) is included.
SCORE_ATOL = {torch.float32: 2e-4, torch.float16: 2e-4, torch.bfloat16: 2e-4}


def features(shape, dtype, device, gen, *, contiguous=True):
    """Random features with some structure (a shared direction) so scores spread out."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    x = x.to(dtype).to(device)
    if not contiguous:  # same values, a row stride that is not d
        wide = torch.full((*shape[:-1], shape[-1] + 3), float("nan"), dtype=dtype, device=device)
        wide[..., 1:1 + shape[-1]] = x
        x = wide[..., 1:1 + shape[-1]]
        assert x.is_contiguous() == (x.numel() == shape[-1])  # a single row is contiguous anyway
    return x


def oracle_prune(source, target, positions, keep, seg_lens, params):
    """float64 scores (and kept indices) from the reference on the exact same input values."""
    s, t, p = source.double().cpu(), target.double().cpu(), positions.double().cpu()
    if s.dim() == 3:
        p = p.expand(s.shape[0], *p.shape[-2:]) if p.dim() == 2 else p
        return reference.prune_padded(s, t, p, keep[0], **params)
    return reference.prune_packed(s, t, p, seg_lens, keep, **params)


def assert_valid_selection(kept, n, keep):
    """kept: distinct, in range, ascending, exactly `keep` of them."""
    assert kept.dtype == torch.int64 and kept.numel() == keep
    assert bool((kept >= 0).all()) and bool((kept < n).all()), kept
    assert bool((kept[1:] > kept[:-1]).all()), f"not strictly ascending: {kept}"


def local_kept(kept, seg_lens, keep, padded):
    """Per-segment kept indices, local to each segment, from either layout's output."""
    kept = kept.cpu()
    if padded:
        return list(kept)
    out, start, first = [], 0, 0
    for n, k in zip(seg_lens, keep):
        out.append(kept[first:first + k] - start)
        start, first = start + n, first + k
    return out


def assert_prune_matches(kept_local, scores, oracle_scores, seg_lens, keep, recover_ratio, atol):
    """Scores close to the oracle; kept exactly the deterministic selection of the fast path's own
    scores; and the top set equal to the oracle's except where scores tie within ``atol``."""
    assert scores.dtype == torch.float32
    scores = scores.double().cpu().reshape(-1)
    oracle_scores = oracle_scores.double().cpu().reshape(-1)
    assert not torch.isnan(scores).any(), "NaN in scores"
    torch.testing.assert_close(scores, oracle_scores, atol=atol, rtol=0)
    start = 0
    for mine, n, k in zip(kept_local, seg_lens, keep):
        assert_valid_selection(mine, n, k)
        own = scores[start:start + n][None]
        want = reference.select(own, k, recover_ratio)[0]
        assert torch.equal(mine, want), f"kept {mine.tolist()} != selection of its own scores {want.tolist()}"
        k_top = k - math.floor(recover_ratio * k)
        o = oracle_scores[start:start + n]
        top_mine = set(reference.select(own, k_top, 0.0)[0].tolist())
        top_oracle = set(reference.select(o[None], k_top, 0.0)[0].tolist())
        boundary = torch.sort(o, descending=True).values[k_top - 1]
        for i in top_mine ^ top_oracle:
            assert abs(o[i] - boundary) <= 2 * atol, f"token {i} differs from the oracle's top set beyond a tie"
        start += n


def oracle_stop(cost, eps, tol, n_iters, *, tau_a=math.inf, a=None):
    """The iteration after which the reference's early exit stops one float64 problem (1, n, m):
    the first t whose plan meets sum_i |sum_j P_ij - a_i exp(-f_i / tau_a)| < tol (n_iters if none)."""
    n = cost.shape[1]
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype) if a is None else a.log()
    inv_tau = 0.0 if math.isinf(tau_a) else 1.0 / tau_a
    for t in range(1, n_iters + 1):
        f, g = reference.sinkhorn(cost, a, eps=eps, n_iters=t, tau_a=tau_a)
        viol = (reference.plan(cost, f, g, eps).sum(2)[0] - torch.exp(log_a - f[0] * inv_tau)).abs().sum()
        if viol < tol:
            return t
    return n_iters
