"""``method="dart"``: duplication-aware selection (DART, Wen et al., arXiv 2502.11494), at layer K.

DART keeps a few *pivot* tokens and then the tokens least similar to the pivots, so that what is
kept duplicates as little as possible. The variant here, chosen to run on what TopV already
captures (no attention weights, no re-projected keys, so FlashAttention stays on) and with an exact
budget per image:

* pivots: the ``pivots`` image tokens with the largest L1 norm of layer K's input hidden states
  (DART's default ranks by the L1 norm of layer K-1's keys and also takes text pivots; we take
  image pivots only, so that each image's selection depends on that image alone);
* duplication of a token: its largest cosine similarity to any pivot, on layer K's
  post-attention-norm output (DART uses the normalised hidden states entering the pruned layer);
* kept: the pivots, then the ``k - pivots`` least duplicated tokens, in one shot (DART's reference
  code instead lets each pivot claim an equal share in turn).
"""

from __future__ import annotations

import torch

from topv import defaults as D
from topv.integrations.scorers.base import ScoreBatch, Scorer, require_finite


class DART(Scorer):
    name = "dart"
    needs = frozenset({"source", "target"})

    def __init__(self, *, pivots: int = D.DART_PIVOTS, check_finite: bool = True):
        if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
            raise ValueError(f"pivots must be an integer >= 1, got {pivots!r}")
        super().__init__(check_finite=check_finite)
        self.pivots = pivots

    def prepare(self, batch: ScoreBatch):
        batch.prepare_top()
        if not batch.uniform:
            p = min(self.pivots, max(batch.lengths))
            batch.table("pivot_valid", lambda: _pivot_valid(batch.lengths, p))

    def score(self, batch: ScoreBatch):
        if self.check_finite:
            require_finite("hidden states", batch.source)
            require_finite("post-attention-norm outputs", batch.target)
        norm = batch.padded(batch.source.float().abs().sum(-1), fill=-torch.inf)  # (S, n_max)
        p = min(self.pivots, max(batch.lengths))
        piv = torch.sort(norm, dim=1, descending=True, stable=True).indices[:, :p]  # (S, p), strongest first
        feats = torch.nn.functional.normalize(batch.padded(batch.target.float()), dim=-1)  # (S, n_max, d)
        sim = feats @ torch.gather(feats, 1, piv[..., None].expand(-1, -1, feats.shape[-1])).transpose(1, 2)
        if not batch.uniform:  # a segment shorter than p has fewer pivots
            sim = sim.masked_fill(~batch.table("pivot_valid", lambda: _pivot_valid(batch.lengths, p))[:, None, :],
                                  -torch.inf)
        score = -sim.amax(-1)  # in [-1, 1]: minus the similarity to the nearest pivot
        # Pivots rank above every other token, among themselves by norm, so a budget below p
        # keeps the strongest ones.
        score = score.scatter(1, piv, (2.0 + torch.arange(p, 0, -1, device=score.device, dtype=score.dtype))
                              .expand(len(batch.lengths), p))
        if not batch.uniform:
            score = score.masked_fill(~batch.pad_valid(), -torch.inf)
        return batch.top_padded(score), batch.packed(score)

    def __repr__(self):
        return f"DART(pivots={self.pivots})"


def _pivot_valid(lengths: list[int], p: int) -> torch.Tensor:
    return torch.arange(p)[None, :] < torch.tensor(lengths)[:, None]
