"""``method="uniform"``: spatially uniform subsampling, TopV's recovery rule with k_rec = k.

Of a segment's n tokens in reading order it keeps ``floor((j + 0.5) * n / k)`` for j < k
(docs/algorithm.md, "Uniform recovery"): evenly spaced over the grid's rows (and a video's frames).
The kept set depends on the layout only; it is built once per layout on the host."""

from __future__ import annotations

import torch

from topv.integrations.scorers.base import ScoreBatch, Scorer
from topv.reference import uniform_indices


class Uniform(Scorer):
    name = "uniform"

    def prepare(self, batch: ScoreBatch):
        def build():
            starts = torch.tensor([0] + batch.lengths[:-1]).cumsum(0).tolist()
            return torch.cat([uniform_indices(n, k) + s for n, k, s in zip(batch.lengths, batch.keeps, starts)])

        batch.table("uniform_kept", build)

    def score(self, batch: ScoreBatch):
        return batch.tables["uniform_kept"], None
