"""Launchers of the C++ extension's backends (``backend="cuda"`` on CUDA tensors, ``"cpp"`` on CPU
tensors): the launcher contract (``topv/_reference.py``) mapped onto the native ops
``topv::*_native``, which ``topv._C`` implements for the CUDA and CPU dispatch keys and which C++
stacks call through the dispatcher. One dispatcher call each; the argument checks already ran.
"""

from __future__ import annotations

import torch

_cost_matrix = torch.ops.topv.cost_matrix_native.default
_sinkhorn = torch.ops.topv.sinkhorn_native.default
_prune = torch.ops.topv.prune_native.default


def cost_matrix(s, t, p, q, alpha, beta, gamma, sigma):
    return _cost_matrix(s, t, p, q, alpha, beta, gamma, sigma)


def sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b):
    return _sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b)


def prune(src, tgt, pos, segs, params, check_finite, max_workspace):
    p = params
    return _prune(src, tgt, pos, segs.lens_list, segs.keep_list, segs.padded, p.alpha, p.beta, p.gamma, p.sigma,
                  p.eps, p.tau, p.n_iters, p.tol, p.recover_ratio, check_finite, max_workspace or 0)
