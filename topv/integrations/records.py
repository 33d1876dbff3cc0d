"""The integration's public records: where a prefill's images are (:class:`Segment`) and what a
pruned prefill did (:class:`PrefillInfo`). Plain data; families produce segments, the engine fills
the prefill record whichever scorer ran."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _empty_index() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass
class Segment:
    """One image (or video) of one batch row, on the host.

    ``token_index`` (int64 (n,)) lists the row's input positions that are scored, in reading
    order; ``positions`` (float32 (n, 2)) their (row, col) centres in the image plane [0, 1]^2;
    ``unscored`` the image's other tokens (LLaVA-NeXT's newline tokens, a CLIP CLS feature), which
    every method keeps. ``kind`` is "image" or "video" (a video's frames share one plane and one
    budget). ``grid`` is (t, h, w) when the scored tokens are one grid of t frames in (frame, row,
    col) order (LLaVA-1.5, Qwen), None for layouts in several parts (LLaVA-NeXT, InternVL)."""

    row: int
    token_index: torch.Tensor
    positions: torch.Tensor
    kind: str = "image"
    unscored: torch.Tensor = field(default_factory=_empty_index)
    grid: tuple[int, int, int] | None = None


@dataclass
class PrefillInfo:
    """What the latest prefill did (``session.last``), the same for every scorer and both stages.

    ``segments`` and ``keep_counts`` (one budget per segment) are host data; ``kept[i]`` (int64,
    ascending) are the kept token indices of ``segments[i]`` in the input row, and ``scores[i]``
    the scorer's per-token scores of that segment (None for scorers that rank nothing), both on
    the model's device. ``index`` (B, L') maps each slot of the pruned sequence to its input
    position; ``valid`` (B, L') is False for padding slots (the input's own padding and the slots
    that align rows). ``cache_lengths`` is each layer's cache length right after the prefill (None
    without a cache). ``host_seconds`` is the host time TopV's hooks spent in this prefill (layout,
    capture, the scorer's call, gather, masks, positions); ``score_seconds`` the scorer's call alone
    (device time when ``session.sync_timing`` is set, host time otherwise). When every budget keeps
    every token (``pruned`` False) the forward ran untouched and ``index`` is the identity.
    ``stage`` is "layer" (pruned after decoder layer K) or "vision" (pruned before layer 0, scored
    from the vision encoder).
    """

    method: str
    input_length: int
    pruned_length: int
    segments: list[Segment]
    keep_counts: list[int]
    kept: list[torch.Tensor]
    scores: list[torch.Tensor] | None
    index: torch.Tensor
    valid: torch.Tensor
    pruned: bool = True
    cache_lengths: list[int] | None = None
    host_seconds: float = 0.0
    score_seconds: float | None = None
    stage: str = "layer"
