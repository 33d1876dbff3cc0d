"""The scorer interface: what a pruning method reads and how it answers.

A scorer says what it needs (:attr:`Scorer.needs`, any of ``"source"``: the hidden states entering
layer K; ``"target"``: layer K's post-attention-norm output; ``"attention"``: the last prompt
token's attention at layer K, averaged over heads, which makes the engine run that one layer
eagerly) and which layer is the last that every token passes (:meth:`Scorer.last_full_layer`).
The engine captures exactly that, gathers it at the scored tokens of every segment, packed
(segments one after another, as ``topv.prune``'s packed layout), and calls :meth:`Scorer.score`
with a :class:`ScoreBatch`. The answer is the kept positions into that packed order: exactly
``keeps[i]`` of segment i, ascending within each segment, segments in order.

In the vision stage (``stage="vision"``) the source and target are the vision encoder's instead:
the hidden states entering the encoder layer whose output the model uses and that layer's norm
output after its attention block, one row per language-model token; attention weights do not
exist there, so scorers that need them are refused at ``apply``.

Nothing here touches hooks or a model: the same scorer can serve another engine that packs its
segments the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class ScoreBatch:
    """One prefill's scored tokens, packed: ``lengths[i]`` tokens of segment i, then segment i+1.

    ``positions`` (float32 (N, 2)) are image-plane positions; ``source``/``target`` (N, d) and
    ``attention`` (float32 (N,)) are filled when the scorer asked for them. Host lists
    ``lengths`` and ``keeps`` say the layout; tensors are on the model's device. The helpers below
    turn per-token scores into an exact-budget selection without reading anything back to the
    host."""

    lengths: list[int]
    keeps: list[int]
    positions: torch.Tensor
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    tables: dict = field(default_factory=dict, repr=False)  # per-layout device tables (``table``)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def table(self, name: str, build):
        """A device tensor that depends only on the layout (lengths, keeps), built once per layout
        by ``build()`` (host-side) and copied without a device synchronisation. Build them in
        :meth:`Scorer.prepare`, which runs before the language model does."""
        t = self.tables.get(name)
        if t is None:
            t = build()
            if isinstance(t, torch.Tensor) and t.device != self.device:
                t = t.to(self.device, non_blocking=True)
            self.tables[name] = t
        return t

    # ---- padded per-segment view -----------------------------------------------------------

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) == 1

    def padded(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(N, ...) packed -> (S, n_max, ...), one segment per row; slots past a segment's length
        hold ``fill``. A view when every segment has the same length."""
        S, n_max = len(self.lengths), max(self.lengths)
        if self.uniform:
            return x.view(S, n_max, *x.shape[1:])
        index, valid = self.table("pad_index", self._pad_index), self.table("pad_valid", self._pad_valid)
        out = x[index.view(-1)].view(S, n_max, *x.shape[1:])
        v = valid.view(S, n_max, *([1] * (x.dim() - 1)))
        return out.masked_fill(~v, fill)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`padded`: (S, n_max, ...) -> (N, ...)."""
        if self.uniform:
            return x.reshape(-1, *x.shape[2:])
        return x.reshape(-1, *x.shape[2:])[self.table("packed_index", self._packed_index)]

    def pad_valid(self) -> torch.Tensor:
        """bool (S, n_max): True where a padded slot holds a token."""
        return self.table("pad_valid", self._pad_valid)

    def _pad_index(self):
        n_max = max(self.lengths)
        start = 0
        rows = []
        for n in self.lengths:
            rows.append(torch.arange(start, start + n_max).clamp(max=start + n - 1))
            start += n
        return torch.stack(rows)

    def _packed_index(self):
        n_max = max(self.lengths)
        return torch.cat([torch.arange(n) + i * n_max for i, n in enumerate(self.lengths)])

    def _pad_valid(self):
        n_max = max(self.lengths)
        return torch.arange(n_max)[None, :] < torch.tensor(self.lengths)[:, None]

    # ---- exact-budget selection --------------------------------------------------------------

    def prepare_top(self) -> None:
        """Build the tables :meth:`top`, :meth:`padded` and :meth:`packed` use."""
        if not self.uniform:
            self.table("pad_index", self._pad_index)
            self.table("pad_valid", self._pad_valid)
            self.table("packed_index", self._packed_index)
        if len(set(self.keeps)) > 1:
            self.table("beyond_keep", self._beyond_keep)
        self.table("kept_flat", self._kept_flat)
        self.table("kept_offset", self._kept_offset)

    def top(self, scores: torch.Tensor) -> torch.Tensor:
        """The ``keeps[i]`` highest ``scores`` (float (N,)) of every segment, as packed kept
        positions (ascending within a segment). Ties go to the lower index; NaN ranks lowest."""
        return self.top_padded(self.padded(scores))

    def top_padded(self, scores: torch.Tensor) -> torch.Tensor:
        """:meth:`top` on scores already padded to (S, n_max); padding slots never win."""
        key = torch.nan_to_num(scores.float(), nan=-torch.inf)
        if not self.uniform:
            key = key.masked_fill(~self.pad_valid(), -torch.inf)
        k_max = max(self.keeps)
        # A stable descending sort ranks equal scores by index; a padding slot (-inf) is never
        # needed, since keeps[i] <= lengths[i].
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k_max]
        if len(set(self.keeps)) > 1:
            n_max = scores.shape[1]
            order = order.masked_fill(self.table("beyond_keep", self._beyond_keep), n_max)
        chosen = torch.sort(order, dim=1).values
        return self.flatten_kept(chosen)

    def flatten_kept(self, chosen: torch.Tensor) -> torch.Tensor:
        """(S, k_max) ascending in-segment indices (entries past keeps[i] ignored) -> packed kept."""
        flat, offset = self.table("kept_flat", self._kept_flat), self.table("kept_offset", self._kept_offset)
        return chosen.reshape(-1)[flat] + offset

    def _beyond_keep(self):
        return torch.arange(max(self.keeps))[None, :] >= torch.tensor(self.keeps)[:, None]

    def _kept_flat(self):
        k_max = max(self.keeps)
        return torch.cat([torch.arange(k) + i * k_max for i, k in enumerate(self.keeps)])

    def _kept_offset(self):
        starts = torch.tensor([0] + self.lengths[:-1]).cumsum(0)
        return torch.repeat_interleave(starts, torch.tensor(self.keeps))


def require_finite(name: str, x: torch.Tensor) -> None:
    """The one host sync of a checked baseline call: NaN or Inf in what it ranks is an error."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"topv: non-finite values (NaN or Inf) in the {name} the scorer ranks by; pass "
                         "check_finite=False to skip this check (the kept set is then unspecified)")


class Scorer:
    """A pruning method: subclass, set :attr:`name` and :attr:`needs`, implement :meth:`score`.

    ``needs`` is a subset of {"source", "target", "attention"} (module docstring). Budgets come
    from the engine, one per segment; a scorer never chooses how many tokens to keep."""

    name = ""
    needs: frozenset[str] = frozenset()
    prune_arguments = False  # True: takes topv.prune's arguments (alpha ... backend) from enable/apply

    def __init__(self, *, check_finite: bool = True):
        """``check_finite``: raise on NaN/Inf in what the method reads (one host sync per prefill)."""
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self.check_finite = check_finite

    def last_full_layer(self, layer: int) -> int:
        """Layers 0..this run on every token; the pruned sequence enters the next one. ``layer``
        is the K the user passed; for most methods that is the answer."""
        return layer

    def check(self, device: torch.device) -> None:
        """Raise now (at ``apply``) if this scorer cannot run for a model on ``device``."""

    def prepare(self, batch: ScoreBatch) -> None:
        """Called once per layout, before the language model runs, with a batch holding the layout
        only (``lengths``, ``keeps``, ``positions``): build per-layout tables here with
        ``batch.table`` so that :meth:`score` reads nothing from the host. By default, the tables
        of :meth:`ScoreBatch.top`."""
        batch.prepare_top()

    def score(self, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed kept positions (int64 (sum(keeps),)) and, when the method ranks tokens, the
        per-token scores it ranked by (float (N,); None otherwise)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
