"""``method="random"``: a uniformly random subset of each image's tokens, exactly its budget.

Seeded: the same call keeps the same tokens (the generator is re-seeded for every prefill), on
any device, without a host sync."""

from __future__ import annotations

import torch

from topv import defaults as D
from topv.integrations.scorers.base import ScoreBatch, Scorer


class Random(Scorer):
    name = "random"

    def __init__(self, *, seed: int = D.RANDOM_SEED, check_finite: bool = True):
        super().__init__(check_finite=check_finite)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generators: dict = {}

    def score(self, batch: ScoreBatch):
        g = self._generators.get(batch.device)
        if g is None:
            g = self._generators[batch.device] = torch.Generator(device=batch.device)
        g.manual_seed(self.seed)
        scores = torch.rand(sum(batch.lengths), generator=g, device=batch.device)
        return batch.top(scores), scores

    def __repr__(self):
        return f"Random(seed={self.seed})"
