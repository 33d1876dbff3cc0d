"""Typed public functions. Each runs the kernel of the ``torch.ops.topv`` op of the same name: straight
from Python when nothing traces the call, else through the dispatcher (torch.compile, FakeTensor,
make_fx), so the typed API, ``torch.ops.topv.*`` and ``torch.compile`` share one implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from topv import _validate as V
from topv import defaults as D
from topv import ops as _ops


def _int_arg(name: str, value) -> int:
    # The dispatcher would reject a float with a RuntimeError; say it as a TypeError first.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return value


def grid_positions(h: int, w: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Patch centres of an h x w grid in image-plane coordinates.

    Returns float32 (h*w, 2): ((r + 0.5)/h, (c + 0.5)/w) for r in range(h), c in range(w), in
    row-major order, so the image spans [0, 1] x [0, 1].
    """
    for name, v in (("h", h), ("w", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    r = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    c = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(h * w, 2)


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
    backend: str = "auto",
) -> torch.Tensor:
    """TopV transport cost between source and target tokens (``docs/algorithm.md``).

    Parameters
    ----------
    source : (n, d) or (B, n, d) float32/float16/bfloat16
    target : (m, d) or (B, m, d), same dtype and batch as ``source``
    src_pos : (n, 2) or (B, n, 2) float, image-plane (row, col) in [0, 1]
    tgt_pos : (m, 2) or (B, m, 2) float; defaults to ``src_pos`` (requires m == n)

    Returns
    -------
    float32 (n, m) or (B, n, m):
    ``alpha (1 - cos)/2 + beta (1 - exp(-|p_i - q_j|^2 / 2 sigma^2)) + gamma |p_i - c| / sqrt(0.5)``.
    """
    if _ops.traced(source, target, src_pos, tgt_pos):
        return torch.ops.topv.cost_matrix(source, target, src_pos, tgt_pos, alpha=alpha, beta=beta, gamma=gamma,
                                          sigma=sigma, backend=backend)
    return _ops.cost_matrix_eager(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma, backend)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched log-domain Sinkhorn, balanced or (semi-)unbalanced; returns float32 potentials (f, g).

    Solves ``min <C, P> + eps sum P (log P - 1) + tau_a KL(P 1 | a) + tau_b KL(P^T 1 | b)`` per
    batch element (generalised KL; ``tau = inf`` keeps that marginal exact, so the defaults are
    balanced OT, as POT's ``ot.sinkhorn``; finite values are POT's
    ``ot.unbalanced.sinkhorn_knopp_unbalanced(..., reg_m=(tau_a, tau_b), reg_type="entropy")``).

    Parameters
    ----------
    cost : float32 (n, m) or (B, n, m)
    a, b : optional positive marginals, (n,)/(B, n) and (m,)/(B, m); uniform when None
    eps : entropic regularisation (> 0)
    n_iters : iterations from f = g = 0, each an f update then a g update:
        ``f <- kappa_a (eps log a - eps LSE_j((g_j - C_ij)/eps))`` with ``kappa_a = tau_a/(tau_a + eps)``
        (1 for inf), and the same for g over the columns
    tol : if > 0, a batch element stops after the first iteration whose plan meets
        ``sum_i |sum_j P_ij - a_i exp(-f_i/tau_a)| < tol`` (checked on the device, no host sync)
    tau_a, tau_b : KL weights of the source / target marginal (> 0; inf: exact)

    The plan is ``P = exp((f_i + g_j - C_ij) / eps)``; with ``tau_b = inf`` its columns match ``b``
    exactly.
    """
    n_iters = _int_arg("n_iters", n_iters)
    if _ops.traced(cost, a, b):
        return torch.ops.topv.sinkhorn(cost, a, b, eps=eps, n_iters=n_iters, tol=tol, tau_a=tau_a, tau_b=tau_b,
                                       backend=backend)
    return _ops.sinkhorn_eager(cost, a, b, eps, n_iters, tol, tau_a, tau_b, backend)


def prune(
    source: torch.Tensor,
    target: torch.Tensor,
    positions: torch.Tensor,
    keep: int | Sequence[int],
    *,
    seg_lens: Sequence[int] | None = None,
    alpha: float = D.ALPHA,
    beta: float = D.BETA,
    gamma: float = D.GAMMA,
    sigma: float = D.SIGMA,
    eps: float = D.EPS,
    tau: float = D.TAU,
    n_iters: int = D.N_ITERS,
    tol: float = D.TOL,
    recover_ratio: float = D.RECOVER_RATIO,
    check_finite: bool = True,
    max_workspace: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the visual tokens TopV keeps, with an exact budget per segment.

    Padded layout: source/target (B, n, d), positions (n, 2) or (B, n, 2), ``keep: int`` ->
    kept int64 (B, keep), indices within each row in ascending order; scores float32 (B, n).

    Packed layout: source/target (T, d), positions (T, 2), ``seg_lens`` (one length per segment,
    summing to T), ``keep`` (one budget per segment; an int applies to every segment) -> kept
    int64 (sum(keep),), indices into the packed tensor, ascending within each segment, segments
    in order; scores float32 (T,). A 2-D source without ``seg_lens`` is one segment.

    The importance of source token i is ``n * sum_j P_ij`` (mean 1 per segment) for the
    semi-relaxed transport plan P of the TopV cost (docs/algorithm.md): the target marginal is
    exact, the source marginal carries the KL weight ``tau`` (``tau=float("inf")`` gives balanced
    OT, whose scores all tend to 1 as iterations grow: the ranking is then an artefact of stopping
    early, and ``gamma`` has no effect). ``keep - floor(recover_ratio * keep)`` tokens are the top
    scores (ties to the lower index), the rest are spread uniformly over the remaining ones.
    Features may be float32/float16/bfloat16; math is float32. ``check_finite`` raises on NaN/Inf
    inputs at the cost of one host sync; pass False for CUDA-graph capture. The result is
    deterministic for a given backend.
    """
    if seg_lens is not None:
        seg_lens = V.int_list("seg_lens", seg_lens)
    if isinstance(keep, int) and not isinstance(keep, bool):
        keep = [keep] if seg_lens is None else [keep] * len(seg_lens)
    keep = V.int_list("keep", keep)
    n_iters = _int_arg("n_iters", n_iters)
    if _ops.traced(source, target, positions):
        return torch.ops.topv.prune(
            source, target, positions, keep, seg_lens=seg_lens, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma,
            eps=eps, tau=tau, n_iters=n_iters, tol=tol, recover_ratio=recover_ratio, check_finite=check_finite,
            max_workspace=max_workspace, backend=backend)
    params = _ops.PruneParams(alpha, beta, gamma, sigma, eps, tau, n_iters, tol, recover_ratio)
    return _ops.prune_eager(source, target, positions, keep, seg_lens, params, check_finite, max_workspace, backend)
