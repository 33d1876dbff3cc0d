"""One prefill layout turned into the device tables the engine needs, built once on the host.

Everything here depends only on the layout (where the images are, their budgets, the padding), not
on which tokens the scorer keeps: how many tokens each row drops, the pruned length L', which slots
of the pruned sequence are padding, the masks of layers > K, the packed positions of the scored
tokens. Only the kept set comes from the device, and the engine turns it into slots with a
handful of fixed-shape ops (no host read). Plans are cached per layout, so a repeated layout (a
benchmark, a batch of same-size images and prompts) costs no host work at all.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from topv.integrations.masks import build_mask
from topv.integrations.records import Segment
from topv.serving import kept_count


def budget(n: int, keep_ratio: float | None, keep: int | None) -> int:
    """Tokens kept of a segment of n scored tokens: ``min(keep, n)``, or
    :func:`topv.serving.kept_count` (the rule engines size their placeholders by)."""
    if keep is not None:
        return min(keep, n)
    return kept_count(n, keep_ratio)


class Plan:
    """The tables of one layout on one device.

    Host: ``segments``, ``lengths`` and ``keeps`` per segment, ``pruned_length`` L', ``skip``
    (every budget keeps everything), ``all_valid`` (no padding slot after pruning).
    Device: ``flat_scored`` (row * T + token of each scored token, packed), ``tok_scored``,
    ``positions`` (packed (N, 2)), ``keep_base`` (B*T bool: True but at scored tokens), ``want``
    (B, L': the rank of the kept token each slot holds; <= 0 for alignment slots), ``valid``
    (B, L'), ``valid_in`` (B, T: the input's own padding), ``last_token`` (B: each row's last real
    token), ``row_start`` (B, 1: b * T)."""

    def __init__(self, segments: list[Segment], keeps: list[int], batch: int, length: int,
                 valid_in: torch.Tensor | None, device: torch.device):
        B, T = batch, length
        self.segments, self.keeps = segments, keeps
        self.lengths = [s.token_index.numel() for s in segments]
        self.batch, self.input_length, self.device = B, T, device
        self.skip = all(k == n for k, n in zip(keeps, self.lengths))
        valid_in = torch.ones(B, T, dtype=torch.bool) if valid_in is None else valid_in.bool()
        rows = torch.cat([torch.full((n,), s.row) for s, n in zip(segments, self.lengths)])
        tok = torch.cat([s.token_index for s in segments])
        for s in segments:
            if not bool(valid_in[s.row, s.token_index].all()):
                raise ValueError(f"topv: attention_mask masks out image tokens of row {s.row}; image tokens must be "
                                 "real tokens")
        flat = rows * T + tok
        dropped = [0] * B
        for s, n, k in zip(segments, self.lengths, keeps):
            dropped[s.row] += n - k
        Lp = T - min(dropped)
        self.pruned_length = Lp
        offset = torch.tensor([Lp - (T - d) for d in dropped])  # alignment slots at the front of each row
        want = torch.arange(Lp)[None, :] - offset[:, None] + 1
        keep_base = torch.ones(B * T, dtype=torch.bool)
        keep_base[flat] = False
        # Which slots are padding does not depend on which tokens a segment keeps (padding never
        # lies inside an image), so any kept set of the right sizes gives it: take each segment's
        # first k tokens.
        some = keep_base.clone()
        some[torch.cat([f[:k] for f, k in zip(torch.split(flat, self.lengths), keeps)])] = True
        rank = some.view(B, T).cumsum(1)
        slot_token = torch.searchsorted(rank, want.clamp(min=1))
        valid = valid_in.gather(1, slot_token.clamp(max=T - 1)) & (want > 0)
        self.all_valid = bool(valid.all())
        last = torch.where(valid_in, torch.arange(T), -1).amax(1)
        to = dict(device=device, non_blocking=True)
        self.flat_scored, self.tok_scored = flat.to(**to), tok.to(**to)
        self.positions = torch.cat([s.positions for s in segments]).to(**to)
        self.keep_base, self.want, self.valid = keep_base.to(**to), want.to(**to), valid.to(**to)
        self.valid_in = valid_in.to(**to)
        self.last_token = last.to(**to)
        self.row_start = (torch.arange(B) * T)[:, None].to(**to)  # (B, 1): row b's offset in (B * T) rows
        self.score_tables: dict = {}  # ScoreBatch.tables: the scorer's own per-layout tables
        self.vision_rows: dict = {}  # vision stage: (rows, total) per encoder-call inputs (Family.vision_rows)
        self._masks: dict = {}

    def mask(self, impl: str, dtype: torch.dtype):
        """The mask of layers > K in the prefill: None when nothing is padded under SDPA or
        FlashAttention (their causal fast paths, as the unpruned model would run)."""
        key = ("pruned", impl, dtype)
        if key not in self._masks:
            self._masks[key] = None if self.all_valid and impl != "eager" else build_mask(
                self.valid, self.pruned_length, impl, dtype)
        return self._masks[key]

    def eager_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive causal + padding mask of the full prefill, for the one layer a scorer that
        reads attention weights runs eagerly."""
        key = ("eager", dtype)
        if key not in self._masks:
            self._masks[key] = build_mask(self.valid_in, self.input_length, "eager", dtype)
        return self._masks[key]


class PlanCache:
    """The last few plans, keyed by their layout's host bytes."""

    def __init__(self, size: int = 8):
        self.size = size
        self._plans: OrderedDict = OrderedDict()

    def get(self, key):
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key, plan: Plan) -> Plan:
        self._plans[key] = plan
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan
