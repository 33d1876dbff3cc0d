"""Readable eager PyTorch reference of TopV scoring: the oracle for every fast path.

Implements exactly ``docs/algorithm.md``. Runs on any device and imports nothing but torch.
Everything is computed in float32, or in float64 when the inputs are float64 (that is how the
tests build the oracle). Inputs here are already validated by :mod:`topv.ops`; these functions
check nothing.

The functions are batched over a leading dimension and never synchronise with the host, so the
same code serves as the ``torch.compile`` baseline in the benchmarks.
"""

from __future__ import annotations

import math

import torch

from topv import defaults as D

_CENTRE = 0.5
_MAX_CENTRE_DIST = math.sqrt(0.5)  # distance from (0.5, 0.5) to a corner of [0,1]^2


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cost_matrix(
    source: torch.Tensor,
    target: torch.Tensor,
    src_pos: torch.Tensor,
    tgt_pos: torch.Tensor | None = None,
    *,
    alpha: float = D.ALPHA,
    beta: float = D.BETA,
    gamma: float = D.GAMMA,
    sigma: float = D.SIGMA,
) -> torch.Tensor:
    """TopV cost ``C`` (B, n, m) from source (B, n, d), target (B, m, d), positions (B, n|m, 2)."""
    dt = _compute_dtype(source, target, src_pos)
    s = _scaled_rows(source.to(dt))
    t = _scaled_rows(target.to(dt))
    p = src_pos.to(dt)
    q = p if tgt_pos is None else tgt_pos.to(dt)

    # cos = s.t / (|s||t|); a zero-norm vector has cos = 0 with everything.
    s_norm = torch.linalg.vector_norm(s, dim=-1)
    t_norm = torch.linalg.vector_norm(t, dim=-1)
    s_inv = torch.where(s_norm > 0, 1.0 / s_norm, torch.zeros_like(s_norm))
    t_inv = torch.where(t_norm > 0, 1.0 / t_norm, torch.zeros_like(t_norm))
    cos = (s @ t.transpose(-1, -2)) * s_inv[..., :, None] * t_inv[..., None, :]
    feature = (1.0 - cos) / 2.0

    dist2 = ((p[..., :, None, :] - q[..., None, :, :]) ** 2).sum(-1)
    spatial = 1.0 - torch.exp(-dist2 / (2.0 * sigma * sigma))

    centre = torch.linalg.vector_norm(p - _CENTRE, dim=-1) / _MAX_CENTRE_DIST
    return alpha * feature + beta * spatial + gamma * centre[..., :, None]


def _scaled_rows(x: torch.Tensor) -> torch.Tensor:
    """x with each row multiplied by a power of two that brings its largest magnitude into
    [0.5, 1) (exact, and cosines are scale-free): the squares and dot products of finite rows then
    neither overflow nor underflow in float32, whatever the rows' magnitude (|x| ~ 1e19 squares to
    inf in float32). The exponent is clamped to what a normal float32 scale can express."""
    _, e = torch.frexp(x.abs().amax(-1, keepdim=True))
    return torch.ldexp(x, -e.clamp(-125, 126))


def relaxation(tau: float, eps: float) -> float:
    """kappa = tau / (tau + eps): the factor of a potential update whose marginal carries the KL
    weight tau (1 for tau = inf, an exact marginal)."""
    return 1.0 if math.isinf(tau) else tau / (tau + eps)


def _log_marginal(w: torch.Tensor | None, batch: int, size: int, like: torch.Tensor) -> torch.Tensor:
    if w is None:
        return torch.full((batch, size), -math.log(size), dtype=like.dtype, device=like.device)
    return torch.log(w.to(like.dtype)).expand(batch, size)


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float = D.EPS,
    n_iters: int = D.N_ITERS,
    tol: float = D.TOL,
    tau_a: float = D.TAU_A,
    tau_b: float = D.TAU_B,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-domain (semi-/un-)balanced Sinkhorn on cost (B, n, m); returns potentials f (B, n), g (B, m).

    Solves ``min <C, P> + eps KL-entropy(P) + tau_a KL(P 1 | a) + tau_b KL(P^T 1 | b)`` (tau = inf:
    that marginal is exact). One iteration is the f update then the g update, each scaled by its
    ``relaxation``. With ``tol > 0`` a batch element freezes after the first iteration whose plan
    has relaxed row violation ``sum_i |sum_j P_ij - a_i exp(-f_i / tau_a)|`` below ``tol``.
    """
    C = cost.to(_compute_dtype(cost))
    B, n, m = C.shape
    log_a = _log_marginal(a, B, n, C)
    log_b = _log_marginal(b, B, m, C)
    ka, kb = relaxation(tau_a, eps), relaxation(tau_b, eps)
    inv_tau_a = 0.0 if math.isinf(tau_a) else 1.0 / tau_a
    f = torch.zeros(B, n, dtype=C.dtype, device=C.device)
    g = torch.zeros(B, m, dtype=C.dtype, device=C.device)
    done = torch.zeros(B, dtype=torch.bool, device=C.device)
    for _ in range(n_iters):
        f_new = ka * (eps * log_a - eps * torch.logsumexp((g[:, None, :] - C) / eps, dim=2))
        g_new = kb * (eps * log_b - eps * torch.logsumexp((f_new[:, :, None] - C) / eps, dim=1))
        f = torch.where(done[:, None], f, f_new)
        g = torch.where(done[:, None], g, g_new)
        if tol > 0:
            row_mass = plan(C, f, g, eps).sum(2)
            violation = (row_mass - torch.exp(log_a - f * inv_tau_a)).abs().sum(1)
            done = done | (violation < tol)
    return f, g


def plan(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Transport plan P = exp((f_i + g_j - C_ij) / eps), (B, n, m)."""
    return torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)


def scores(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Importance score_i = n * sum_j P_ij (mean 1 per segment), (B, n)."""
    return cost.shape[1] * plan(cost, f, g, eps).sum(2)


def uniform_indices(n: int, k: int, device=None) -> torch.Tensor:
    """The uniform recovery rule (docs/algorithm.md): k of n positions in reading order,
    ``floor((2j + 1) n / 2k)`` for j < k, evenly spaced."""
    j = torch.arange(k, device=device)
    return ((2 * j + 1) * n) // (2 * k)


def select(score: torch.Tensor, keep: int, recover_ratio: float) -> torch.Tensor:
    """Kept indices (B, keep), ascending: top scores (ties to the lower index) + uniform recovery."""
    B, n = score.shape
    k_rec = math.floor(recover_ratio * keep)
    k_top = keep - k_rec
    # NaN ranks below every number; a stable descending sort puts the lower index first on ties.
    key = torch.nan_to_num(score, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    top = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k_top]
    is_top = torch.zeros(B, n, dtype=torch.int8, device=score.device).scatter_(1, top, 1)
    # The non-top indices in ascending order: a stable sort moves the 0s (not top) first.
    rest = torch.sort(is_top, dim=1, stable=True).indices[:, : n - k_top]
    recovered = rest[:, uniform_indices(n - k_top, k_rec, score.device)] if k_rec else rest[:, :0]
    return torch.sort(torch.cat([top, recovered], dim=1), dim=1).values


def prune_padded(
    source: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor,
    keep: int,
    *,
    alpha: float = D.ALPHA,
    beta: float = D.BETA,
    gamma: float = D.GAMMA,
    sigma: float = D.SIGMA,
    eps: float = D.EPS,
    tau: float = D.TAU,
    n_iters: int = D.N_ITERS,
    tol: float = D.TOL,
    recover_ratio: float = D.RECOVER_RATIO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopV on a padded batch: source/target (B, n, d), positions (B, n, 2) -> kept (B, keep), scores (B, n).

    Semi-relaxed OT: the source marginal carries the KL weight ``tau``, the target marginal is exact.
    """
    C = cost_matrix(source, target, positions, None, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma)
    f, g = sinkhorn(C, eps=eps, n_iters=n_iters, tol=tol, tau_a=tau)
    s = scores(C, f, g, eps)
    return select(s, keep, recover_ratio), s


def prune_packed(
    source: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor,
    seg_lens: list[int],
    keep: list[int],
    **params,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopV on packed segments: source/target (T, d), positions (T, 2) -> kept (sum(keep),), scores (T,)."""
    kept, score, start = [], [], 0
    for n, k in zip(seg_lens, keep):
        sl = slice(start, start + n)
        idx, s = prune_padded(source[None, sl], target[None, sl], positions[None, sl], k, **params)
        kept.append(idx[0] + start)
        score.append(s[0])
        start += n
    return torch.cat(kept), torch.cat(score)
