"""``method="fastv"``: FastV (Chen et al., ECCV 2024) as published.

Image tokens are ranked by the attention the last prompt token pays them in layer K-1, averaged
over heads; each image keeps its top tokens; layers K.. run on the kept ones (K = 2 by default, as
in the paper). Reading attention weights needs that one layer to run eagerly in the prefill (the
engine does that when a scorer needs ``"attention"``); every other layer keeps its implementation.
"""

from __future__ import annotations

from topv.integrations.scorers.base import ScoreBatch, Scorer, require_finite


class FastV(Scorer):
    name = "fastv"
    needs = frozenset({"attention"})

    def last_full_layer(self, layer):
        if layer < 1:
            raise ValueError(f"FastV's K must be >= 1 (it reads layer K-1's attention), got layer={layer}")
        return layer - 1

    def score(self, batch: ScoreBatch):
        if self.check_finite:
            require_finite("attention weights", batch.attention)
        return batch.top(batch.attention), batch.attention
