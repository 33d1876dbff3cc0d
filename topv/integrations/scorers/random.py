"""``method="random"``: a uniformly random subset of each image's tokens, exactly its budget.

Seeded and counter-based: a token's score is a hash of (seed, its index in the prefill's visual
tokens), computed with integer tensor ops. The same call keeps the same tokens on any device, and
no random generator is involved, so the scorer captures in a CUDA graph (a generator's offset
cannot advance during capture) and never syncs with the host."""

from __future__ import annotations

import torch

from topv import defaults as D
from topv.integrations.scorers.base import ScoreBatch, Scorer

_MASK = 0xFFFFFFFF


def _hash32(x):
    """A 32-bit integer mix (xorshift-multiply rounds, a bijection of [0, 2**32)) on int64 tensors or
    Python ints in that range: every product stays below 2**63, so no step overflows."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


class Random(Scorer):
    name = "random"

    def __init__(self, *, seed: int = D.RANDOM_SEED, check_finite: bool = True):
        super().__init__(check_finite=check_finite)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._key = _hash32(seed & _MASK) & 0x7FFFFFFF  # Python ints: the same mix, no tensor

    def score(self, batch: ScoreBatch):
        index = torch.arange(sum(batch.lengths), device=batch.device, dtype=torch.int64)
        bits = _hash32(index ^ self._key)  # a bijection of [0, 2**32): distinct tokens, distinct bits
        scores = (bits >> 8).to(torch.float32) * 2.0**-24  # the top 24 bits: exact in float32, in [0, 1)
        return batch.top(scores), scores

    def __repr__(self):
        return f"Random(seed={self.seed})"
