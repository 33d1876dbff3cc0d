"""What a serving engine calls to prune visual tokens before the language model (torch only).

Serving engines (vLLM, SGLang, TensorRT-LLM, OpenVINO GenAI) accept pruning only on the visual
embeddings, before the language model runs: their paged KV cache and attention metadata assume one
token set for every layer. This module is TopV's side of that contract, usable without Hugging
Face (``docs/integration.md``, "Serving engines"):

* :func:`kept_count` -- how many tokens an item of n visual tokens keeps at a ratio: a function of
  n and the ratio only, so an engine can size an item's placeholder tokens before any embedding
  exists. The Hugging Face integration's budgets are this function too.
* :func:`select_tokens` -- given one request's visual tokens at language-model granularity (the
  vision encoder's source and target, docs/integration.md says which), the items' grids and the
  ratio: which tokens each item keeps and their original positions, 1-D and M-RoPE rows.
* :func:`group_mean` -- patch features to language-model tokens when each token merges a run of
  consecutive patches (Qwen2-VL's 2 x 2 merger): the mean of each run.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from topv.api import grid_positions, prune


def _positive_int(value) -> int | None:
    """``value`` as a Python int if it is an integer >= 1 (numpy and torch integers included), else None."""
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if value >= 1 else None


def kept_count(n: int, keep_ratio: float) -> int:
    """Tokens kept of an item of ``n`` visual tokens: ``floor(keep_ratio * n + 0.5)`` (round half
    up, in IEEE double), at least 1 and at most n. Depends on n and the ratio only."""
    count = _positive_int(n)
    if count is None:
        raise ValueError(f"n must be an integer >= 1 (an item's visual tokens), got {n!r}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    return min(count, max(1, math.floor(float(keep_ratio) * count + 0.5)))


def group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """(M, ...) -> (M / group, ...): the mean of each run of ``group`` consecutive rows.

    Qwen2-VL's merger turns each run of ``spatial_merge_size**2`` consecutive patches into one
    language-model token; TopV scores that token by the mean of the run's source (and target)
    features (docs/integration.md says why). Qwen2.5-VL's encoder holds the runs in window order:
    put them back first (``runs[argsort(window_index)]``)."""
    if _positive_int(group) is None:
        raise ValueError(f"group must be an integer >= 1, got {group!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] % group:
        raise ValueError(f"x must be a tensor whose first dimension is a multiple of group={group}, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    return x.reshape(x.shape[0] // group, group, *x.shape[1:]).mean(1)


@dataclass(frozen=True)
class Selection:
    """What :func:`select_tokens` keeps of one request.

    ``kept`` int64 (K,): indices into the request's packed visual tokens, ascending within each
    item, items in order (gather the embeddings with it). ``counts``: per item, exactly
    ``kept_count(n_i, keep_ratio)``. ``positions`` int64 (K,): each kept token's original 1-D
    position, ``start + index within its item``. ``mrope`` int64 (3, K): its original M-RoPE
    (temporal, height, width) rows, ``start + (floor(frame * time_interval), row, col)`` (Qwen2-VL's
    rule). ``scores`` float32 (T,): TopV's importance of every token. Tensors are on the features'
    device."""

    kept: torch.Tensor
    counts: list[int]
    positions: torch.Tensor
    mrope: torch.Tensor
    scores: torch.Tensor


_PRUNE_KEYWORDS = frozenset(p.name for p in inspect.signature(prune).parameters.values()
                            if p.kind is p.KEYWORD_ONLY) - {"seg_lens"}


def _grids(grids) -> list[tuple[int, int, int]]:
    if hasattr(grids, "tolist"):  # a tensor or array of grids
        grids = grids.tolist()
    if not isinstance(grids, Sequence) or isinstance(grids, str) or not grids:
        raise ValueError(f"grids must be a non-empty sequence of (t, h, w) or (h, w) per item, got {grids!r}")
    out = []
    for i, g in enumerate(grids):
        g = tuple(g) if isinstance(g, Sequence) and not isinstance(g, str) else (g,)
        if len(g) == 2:
            g = (1, *g)
        g = tuple(_positive_int(v) for v in g)
        if len(g) != 3 or None in g:
            raise ValueError(f"grids[{i}] must be (t, h, w) or (h, w) of integers >= 1, got {grids[i]!r}")
        out.append(g)
    return out


def _per_item(name: str, values, count: int, default, kind: type) -> list:
    """One ``kind`` (numbers.Integral or numbers.Real) per item, as Python numbers."""
    if values is None:
        return [default] * count
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != count or any(isinstance(v, bool) or not isinstance(v, kind) for v in values):
        what = "integer" if kind is numbers.Integral else "number"
        raise ValueError(f"{name} must give one {what} per item ({count}), got {values!r}")
    return [int(v) if kind is numbers.Integral else float(v) for v in values]


def select_tokens(source: torch.Tensor, target: torch.Tensor, grids, keep_ratio: float, *,
                  starts: Sequence[int] | None = None, time_intervals: Sequence[float] | None = None,
                  **prune_kwargs) -> Selection:
    """TopV's choice for one request's visual tokens, before the language model runs.

    Parameters
    ----------
    source, target : (T, d) the request's visual tokens at language-model granularity, items one
        after another, each item's tokens in (frame, row, col) order: the vision encoder's source
        (the hidden states entering the layer whose output the model uses) and target (that
        layer's norm output after its attention block), merged as the model merges patches into
        tokens (:func:`group_mean` for Qwen2-VL).
    grids : per item (t, h, w) or (h, w) in language-model tokens (Qwen2-VL: ``image_grid_thw``
        with h and w divided by ``spatial_merge_size``); the sum of t*h*w must be T. The image
        plane of the cost is each frame's ``grid_positions(h, w)``; a video's frames share it and
        one budget.
    keep_ratio : in (0, 1]; item i keeps ``kept_count(t*h*w, keep_ratio)`` tokens.
    starts : per item, the position of its first token in the prompt (M-RoPE: the start position
        of the item, after its vision-start token); default 0, i.e. positions relative to the item.
    time_intervals : per item, M-RoPE's temporal step (Qwen2.5-VL's videos:
        ``second_per_grid * tokens_per_second``); default 1.
    prune_kwargs : passed to :func:`topv.prune` (alpha ... backend, check_finite).

    Returns a :class:`Selection`.
    """
    unknown = sorted(set(prune_kwargs) - _PRUNE_KEYWORDS)
    if unknown:
        raise TypeError(f"select_tokens got unexpected keyword arguments {unknown}; it takes starts, time_intervals "
                        f"and topv.prune's {sorted(_PRUNE_KEYWORDS)}")
    items = _grids(grids)
    for name, t in (("source", source), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (T, d) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    lengths = [t * h * w for t, h, w in items]
    if source.shape[0] != sum(lengths) or target.shape != source.shape:
        raise ValueError(f"source and target must both be (T, d) with T = sum of t*h*w over grids = {sum(lengths)}; "
                         f"got source {tuple(source.shape)}, target {tuple(target.shape)}")
    counts = [kept_count(n, keep_ratio) for n in lengths]
    starts = _per_item("starts", starts, len(items), 0, numbers.Integral)
    intervals = _per_item("time_intervals", time_intervals, len(items), 1.0, numbers.Real)
    plane, rows, flat = [], [], []
    for (t, h, w), n, s, dt in zip(items, lengths, starts, intervals):
        g = grid_positions(h, w)
        plane.append(g.repeat(t, 1) if t > 1 else g)
        frame = torch.arange(n) // (h * w)
        rc = torch.arange(n) % (h * w)
        rows.append(torch.stack([(frame * dt).long(), rc // w, rc % w]) + s)  # Qwen2-VL's rounding
        flat.append(torch.arange(n) + s)
    device = source.device
    kept, scores = prune(source, target, torch.cat(plane).to(device), counts, seg_lens=lengths, **prune_kwargs)
    positions = torch.cat(flat).to(device, non_blocking=True)
    mrope = torch.cat(rows, 1).to(device, non_blocking=True)
    return Selection(kept, counts, positions[kept], mrope[:, kept], scores)


__all__ = ["kept_count", "group_mean", "select_tokens", "Selection"]
