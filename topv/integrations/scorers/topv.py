"""``method="topv"``: the paper's optimal-transport scoring, our ``topv.prune`` ops (docs/algorithm.md)."""

from __future__ import annotations

import torch

import topv
from topv import _validate as V
from topv import defaults as D
from topv.integrations.scorers.base import ScoreBatch, Scorer
from topv.ops import PruneParams, resolve_backend


class TopV(Scorer):
    """Scores each segment's source (layer K's input) against its target (layer K's
    post-attention-norm output) with ``topv.prune``; every argument passes through unchanged."""

    name = "topv"
    needs = frozenset({"source", "target"})
    prune_arguments = True

    def __init__(self, *, alpha: float = D.ALPHA, beta: float = D.BETA, gamma: float = D.GAMMA,
                 sigma: float = D.SIGMA, eps: float = D.EPS, tau: float = D.TAU, n_iters: int = D.N_ITERS,
                 tol: float = D.TOL, recover_ratio: float = D.RECOVER_RATIO, check_finite: bool = True,
                 max_workspace: int | None = None, backend: str = "auto"):
        params = PruneParams(alpha, beta, gamma, sigma, eps, tau, n_iters, tol, recover_ratio)
        V.prune_params(params)
        if max_workspace is not None:
            V.max_workspace(max_workspace)
        super().__init__(check_finite=check_finite)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {backend!r}")
        self.kwargs = dict(params._asdict(), check_finite=check_finite, max_workspace=max_workspace, backend=backend)

    def check(self, device):
        resolve_backend(self.kwargs["backend"], torch.device(device))

    def prepare(self, batch):
        pass  # topv.prune takes the layout as host lists

    def score(self, batch: ScoreBatch):
        return topv.prune(batch.source, batch.target, batch.positions, batch.keeps, seg_lens=batch.lengths,
                          **self.kwargs)

    def __repr__(self):
        return f"TopV({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"
