"""Launchers of the reference backend (``backend="reference"``): the eager spec of
:mod:`topv.reference` behind the launcher contract every backend implements (:mod:`topv.backends`).

The contract (inputs already validated and normalised by :mod:`topv.ops`):

* ``cost_matrix(s, t, p, q, alpha, beta, gamma, sigma)``: s (B, n, d), t (B, m, d) of one feature
  dtype, any strides; p (B, n, 2), q (B, m, 2) float32 -> C (B, n, m) float32.
* ``sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b)``: C (B, n, m) float32 contiguous,
  log marginals (B, n) / (B, m) float32 contiguous or None (uniform) -> f (B, n), g (B, m) float32.
* ``prune(src, tgt, pos, segs, params, check_finite)``: src / tgt as the caller gave them, a padded
  batch (B, n, d) or packed rows (T, d), any strides; pos float32 contiguous: (T, 2), or for a
  padded layout the shared (n, 2) or per-row (B, n, 2); segs the :class:`topv.ops.Segments`
  layout, params :class:`topv.ops.PruneParams` -> kept int64, (B, keep) indices within each row
  (padded) or (sum(keep),) indices into the packed rows; scores float32 (B, n) or (T,); and a
  device flag that is nonzero when an input is not finite (checked only with ``check_finite``;
  None otherwise). ``max_workspace`` (bytes or None) caps the temporary cost buffer of the GPU
  backends (``topv._triton.workspace_cap``; the CUDA backend applies the same rule); the reference
  and the C++ CPU kernels hold each segment's n² cost whole.
"""

from __future__ import annotations

import torch

from topv import reference


def cost_matrix(s, t, p, q, alpha, beta, gamma, sigma):
    return reference.cost_matrix(s, t, p, q, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma).float()


def sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b):
    a = None if log_a is None else log_a.double().exp()
    b = None if log_b is None else log_b.double().exp()
    f, g = reference.sinkhorn(C, a, b, eps=eps, n_iters=n_iters, tol=tol, tau_a=tau_a, tau_b=tau_b)
    return f.float(), g.float()


def _nonfinite(*tensors: torch.Tensor) -> torch.Tensor:
    bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        bad = bad | ~torch.isfinite(x).all()
    return bad


def prune(src, tgt, pos, segs, params, check_finite, max_workspace):
    kw = params._asdict()  # PruneParams' fields are the reference's keyword names
    bad = _nonfinite(src, tgt, pos) if check_finite else None
    if segs.padded:
        B, n = src.shape[:2]
        p = pos if pos.dim() == 3 else pos.expand(B, n, 2)
        kept, scores = reference.prune_padded(src, tgt, p, segs.keep[0], **kw)
    else:
        kept, scores = reference.prune_packed(src, tgt, pos, segs.lens_list, segs.keep_list, **kw)
    return kept, scores.float(), bad
