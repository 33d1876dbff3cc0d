"""Scorers: how each method picks the tokens an image keeps, behind one interface (``base.py``).

``METHODS`` maps ``topv.enable(method=...)`` names to scorer classes; adding a method is one module
here and one line in ``METHODS`` (``docs/integration.md``, "How to add a scorer"). Only ``topv``
takes the pruning arguments (alpha ... backend); every method takes ``check_finite``."""

from __future__ import annotations

from topv.integrations.scorers.base import ScoreBatch, Scorer
from topv.integrations.scorers.dart import DART
from topv.integrations.scorers.fastv import FastV
from topv.integrations.scorers.random import Random
from topv.integrations.scorers.topv import TopV
from topv.integrations.scorers.uniform import Uniform

METHODS: dict[str, type[Scorer]] = {
    "topv": TopV,
    "fastv": FastV,
    "random": Random,
    "uniform": Uniform,
    "dart": DART,
}


def make_scorer(method: str, *, check_finite: bool = True, **prune_kwargs) -> Scorer:
    """The scorer of ``method``; ``prune_kwargs`` reach methods that take the pruning arguments
    (``Scorer.prune_arguments``; the caller checks that no other method was given any)."""
    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return cls(check_finite=check_finite, **(prune_kwargs if cls.prune_arguments else {}))


__all__ = ["DART", "METHODS", "FastV", "Random", "ScoreBatch", "Scorer", "TopV", "Uniform", "make_scorer"]
