"""TopV inside the prefill of Hugging Face VLMs: :func:`enable`, :func:`apply`, :func:`remove`.

What it does (``docs/integration.md`` is the full statement): during the prefill, layers 0..K run
on every token; at layer K the hidden states entering the layer (source) and its
post-attention-norm output (target) are captured at each image's visual positions; ``topv.prune``
picks the tokens each image keeps; layers K+1.. run on the kept sequence only, every token at its
original position. Decoding then continues on a cache whose layers have different lengths
(``kv="after_k"``) or one pruned length (``kv="all"``).

How it hooks in, without copying modeling code and without touching transformers classes: forward
(pre-)hooks with kwargs on *this model instance's* modules only:

* the VLM itself (pre-hook): reads ``input_ids`` and the image layout (grid sizes) of a prefill;
* the language model (pre-hook and hook): starts/finishes a prefill, prepares decode masks, and
  under ``kv="all"`` evicts the pruned tokens from layers <= K once the prefill is done;
* every decoder layer (pre-hook): layer K captures the source; layer K+1 prunes and swaps
  ``hidden_states``; layers > K (and, in decode, every layer whose cache was pruned) get the
  matching ``attention_mask``, ``position_ids`` and rotary ``position_embeddings``;
* layer K's ``post_attention_layernorm`` (hook): captures the target.

The per-request record (what was kept, the kept-token mask) lives in a dict keyed by the cache
object, so decoding finds it however the cache is carried (``generate`` or a hand-written loop).
transformers is imported lazily, only when :func:`apply` is called.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
import weakref
from dataclasses import dataclass

import torch

import topv

# Versions on which the whole integration test suite was run (docs/integration.md says where).
_MIN_VERSION = (5, 17)
_VERIFIED = ("5.17.0", "5.24.0")

_SESSION_ATTR = "_topv_session"


# --------------------------------------------------------------------------------------------
# Configuration and inspection records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopVConfig:
    """Settings of one :func:`apply`. Exactly one of ``keep_ratio`` / ``keep`` is set."""

    keep_ratio: float | None
    keep: int | None
    layer: int
    kv: str
    prune_kwargs: dict


@dataclass
class Segment:
    """One image (or video) of one batch row: the token indices that TopV scores and their
    image-plane positions. Visual tokens of the image that are not scored (LLaVA-NeXT newline
    tokens, a CLS token) are not listed and are always kept."""

    row: int
    token_index: torch.Tensor  # int64 (n,), indices into the row of the prefill input
    positions: torch.Tensor  # float32 (n, 2), (row, col) in [0, 1]^2
    kind: str = "image"


@dataclass
class PrefillInfo:
    """What the last pruned prefill did (``session.last``), for inspection, tests and the demo.

    ``kept[i]`` lists the kept token indices (into the input row) of ``segments[i]``.
    ``index`` (B, L') maps each slot of the pruned sequence to its input index; ``valid`` (B, L')
    is False for padding slots (the input's own padding and the slots added to align rows).
    ``cache_lengths`` is the length of each layer's cache right after the prefill (None without a
    cache).
    """

    input_length: int
    pruned_length: int
    segments: list[Segment]
    keep_counts: list[int]
    kept: list[torch.Tensor]
    index: torch.Tensor
    valid: torch.Tensor
    cache_lengths: list[int] | None = None
    prune_seconds: float | None = None


@dataclass(eq=False)
class _Record:
    """Per-request state attached (through a weak dict) to the cache a prefill filled."""

    input_length: int  # N: the unpruned prefill length
    pruned_length: int  # L'
    valid: torch.Tensor  # bool (B, L'): key validity of the pruned prefix
    pruned_layers: frozenset[int]  # layers whose cache holds only the pruned prefix
    all_valid: bool = False  # no padding slot in the pruned prefix


# --------------------------------------------------------------------------------------------
# Families: where the image tokens are and how they lie in the image plane
# --------------------------------------------------------------------------------------------


def _grid_segments(ids_row: torch.Tensor, token_id: int, counts: list[tuple[list[torch.Tensor], str]], row: int,
                   what: str) -> list[Segment]:
    """Split one row's ``token_id`` positions, in order, into images of known token counts.

    ``counts`` gives, per image, the positions tensor of each of its tokens (its length is the
    image's token count). Images may be adjacent (LLaVA places them back to back)."""
    where = (ids_row == token_id).nonzero().flatten()
    need = sum(p.shape[0] for p, _ in counts)
    if where.numel() != need:
        raise ValueError(f"row {row}: {where.numel()} {what} tokens in input_ids, but the image layout "
                         f"expects {need}")
    out, start = [], 0
    for pos, kind in counts:
        n = pos.shape[0]
        out.append(Segment(row, where[start:start + n], pos, kind))
        start += n
    return out


class _Family:
    name = ""
    classes = ""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def language_model(self):
        return self.model.model.language_model

    def decode_positions(self, record, cached: int, batch: int, q: int, device):
        """Positions of q new tokens after a pruned prefill when the caller gave none, as the
        unpruned model would derive them from its (full) cache; None: the language model's own
        pre-hook supplies them (plain 1-D RoPE)."""
        return None

    def segments(self, input_ids: torch.Tensor, kwargs: dict, embeds: torch.Tensor | None = None) -> list[Segment]:
        """The scored image tokens of a prefill, per image, in reading order. ``kwargs`` are the
        VLM's forward kwargs; ``embeds`` the embeddings entering the language model."""
        raise NotImplementedError


class _Llava(_Family):
    """LLaVA-1.5: each image is ``image_token_id`` x (s*s) tokens, an s x s row-major grid."""

    name = "LLaVA-1.5"
    classes = "LlavaForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.token_id = self.config.image_token_id
        s = vc.image_size // vc.patch_size
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        self.cls = strategy == "full"  # the CLS feature comes first; it is kept, not scored
        self.side = s

    def segments(self, input_ids, kwargs, embeds=None):
        n_img = self.side * self.side + int(self.cls)
        grid = topv.grid_positions(self.side, self.side, device=input_ids.device)
        out = []
        for b in range(input_ids.shape[0]):
            count = int((input_ids[b] == self.token_id).sum())
            if count % n_img:
                raise ValueError(f"row {b}: {count} image tokens is not a multiple of {n_img} tokens per image")
            dummy = torch.zeros(n_img, 2, device=input_ids.device)
            for seg in _grid_segments(input_ids[b], self.token_id, [(dummy, "image")] * (count // n_img), b, "image"):
                idx = seg.token_index[1:] if self.cls else seg.token_index
                out.append(Segment(b, idx, grid, "image"))
        return out


class _QwenVL(_Family):
    """Qwen2-VL / Qwen2.5-VL: image i has ``t*(h/m)*(w/m)`` tokens (``image_grid_thw``, m = the
    spatial merge size), laid out t-major then row-major. A video is one segment whose frames
    all lie in the same image plane (every frame gets the same grid positions)."""

    name = "Qwen2-VL / Qwen2.5-VL"
    classes = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        c = self.config
        self.image_id = c.image_token_id
        self.video_id = c.video_token_id
        self.merge = c.vision_config.spatial_merge_size

    def decode_positions(self, record, cached, batch, q, device):
        deltas = getattr(self.model.model, "rope_deltas", None)
        if deltas is None:
            return None
        start = record.input_length + cached - record.pruned_length
        pos = torch.arange(start, start + q, device=device).view(1, 1, q).expand(3, batch, q)
        return pos + deltas.to(device).view(1, -1, 1)

    def segments(self, input_ids, kwargs, embeds=None):
        pos = kwargs.get("position_ids")
        if pos is not None and pos.dim() == 3:
            pos = pos[-3:]  # (4, B, T) carries the text positions first; keep (t, h, w)
        else:
            pos = None
        out = []
        for token_id, key, kind in ((self.image_id, "image_grid_thw", "image"), (self.video_id, "video_grid_thw", "video")):
            thw = kwargs.get(key)
            if thw is None and pos is None and (input_ids == token_id).any():
                raise ValueError(f"topv: input_ids hold {kind} tokens but neither `{key}` nor 3-D position_ids "
                                 "were passed, so their layout is unknown")
            grids = None if thw is None else [(t, h // self.merge, w // self.merge) for t, h, w in thw.tolist()]
            j = 0
            for b in range(input_ids.shape[0]):
                where = (input_ids[b] == token_id).nonzero().flatten()
                if where.numel() == 0:
                    continue
                # Every image/video is wrapped in vision start/end tokens: one run of tokens each.
                cuts = ((where[1:] - where[:-1]) != 1).nonzero().flatten() + 1
                for run in torch.tensor_split(where, cuts.tolist()):
                    if grids is not None:
                        if j >= len(grids):
                            raise ValueError(f"topv: `{key}` lists {len(grids)} {kind}s; input_ids hold more")
                        t, gh, gw = grids[j]
                        if t * gh * gw != run.numel():
                            raise ValueError(f"topv: {kind} {j} has {run.numel()} tokens, `{key}` says "
                                             f"{t}x{gh}x{gw}")
                        p = topv.grid_positions(gh, gw, device=input_ids.device).repeat(t, 1)
                    else:
                        # The model's own M-RoPE positions: the h and w axes count rows and columns.
                        hw = pos[1:, b, run].to(torch.float32)
                        hw = hw - hw.min(dim=1, keepdim=True).values
                        size = hw.max(dim=1, keepdim=True).values + 1
                        p = ((hw + 0.5) / size).T.contiguous()
                    out.append(Segment(b, run, p, kind))
                    j += 1
            if grids is not None and j != len(grids):
                raise ValueError(f"topv: `{key}` lists {len(grids)} {kind}s; input_ids hold {j}")
        out.sort(key=lambda s: (s.row, int(s.token_index[0])))
        return out


class _LlavaNext(_Family):
    """LLaVA-NeXT (AnyRes): per image, the base view (s x s tokens), then the unpadded high-res
    grid of H' rows, each of W' tokens followed by one ``image_newline`` token (a single-tile
    image is the base view plus one newline). Base view and grid are one segment and share the
    image plane: base token (r, c) sits at ((r+.5)/s, (c+.5)/s), grid token (r, c) at
    ((r+.5)/H', (c+.5)/W'). Newline tokens are not scored and always kept.

    The layout is read off the embeddings themselves (newline tokens equal the learned
    ``image_newline`` vector), so it needs neither ``image_sizes`` nor the pinpoint grid, which
    ``generate`` does not forward to the prefill in recent transformers."""

    name = "LLaVA-NeXT"
    classes = "LlavaNextForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.token_id = self.config.image_token_id
        self.side = vc.image_size // vc.patch_size

    def segments(self, input_ids, kwargs, embeds=None):
        if embeds is None:
            return []  # decided again when the embeddings reach the language model
        newline = self.model.model.image_newline.to(embeds.dtype)
        s2 = self.side * self.side
        base = topv.grid_positions(self.side, self.side, device=input_ids.device)
        out = []
        for b in range(input_ids.shape[0]):
            where = (input_ids[b] == self.token_id).nonzero().flatten()
            is_nl = (embeds[b, where] == newline).all(-1)
            i, n = 0, where.numel()
            while i < n:
                if n - i < s2:
                    raise ValueError(f"topv: row {b}: {n - i} image tokens left, fewer than a base view ({s2})")
                idx, pos = [where[i:i + s2]], [base]
                i += s2
                nl = is_nl[i:].nonzero().flatten()
                if nl.numel() == 0:
                    raise ValueError(f"topv: row {b}: image without newline tokens; not a LLaVA-NeXT layout")
                w = int(nl[0])  # tokens before the first newline: W' (0 for a single-tile image)
                rows = 0
                while w > 0 and i + w < n and bool(is_nl[i + w]):
                    idx.append(where[i:i + w])
                    i += w + 1
                    rows += 1
                if w == 0:
                    i += 1
                else:
                    r = torch.arange(rows, device=input_ids.device, dtype=torch.float32)
                    c = torch.arange(w, device=input_ids.device, dtype=torch.float32)
                    pos.append(torch.stack(torch.meshgrid((r + 0.5) / rows, (c + 0.5) / w, indexing="ij"),
                                           -1).reshape(-1, 2))
                out.append(Segment(b, torch.cat(idx), torch.cat(pos)))
        return out


class _InternVL(_Family):
    """InternVL: an image is ``image_seq_length`` tokens per tile (a q x q grid, q = its side),
    one run between <img> and </img>. With several tiles the last is the thumbnail of the whole
    image. Tiles go into one image plane: tile t of an r x c arrangement covers rows
    [t // c / r, (t // c + 1) / r) and columns [t % c / c, (t % c + 1) / c); the thumbnail covers
    the whole plane. The model is not told the arrangement (the processor picks it from the
    aspect ratio), so it is taken as the most square factorisation with r <= c (exact for 1, 2,
    3, 5, 7 tiles and square arrangements, a guess for, e.g., 6 = 2x3 or 3x2)."""

    name = "InternVL"
    classes = "InternVLForConditionalGeneration"

    def __init__(self, model):
        super().__init__(model)
        self.token_id = self.config.image_token_id
        self.per_tile = self.config.image_seq_length
        self.q = int(round(math.sqrt(self.per_tile)))
        if self.q * self.q != self.per_tile:
            raise ValueError(f"topv: InternVL image_seq_length {self.per_tile} is not a square grid")

    def _positions(self, tiles, device):
        g = topv.grid_positions(self.q, self.q, device=device)
        if tiles == 1:
            return g
        n = tiles - 1
        r = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
        c = n // r
        t = torch.arange(n, device=device)
        off = torch.stack([(t // c).float() / r, (t % c).float() / c], -1)  # (n, 2) tile corners
        tiles_pos = (off[:, None, :] + g[None] / torch.tensor([r, c], device=device)).reshape(-1, 2)
        return torch.cat([tiles_pos, g])

    def segments(self, input_ids, kwargs, embeds=None):
        out = []
        for b in range(input_ids.shape[0]):
            where = (input_ids[b] == self.token_id).nonzero().flatten()
            if where.numel() == 0:
                continue
            cuts = ((where[1:] - where[:-1]) != 1).nonzero().flatten() + 1
            for run in torch.tensor_split(where, cuts.tolist()):
                if run.numel() % self.per_tile:
                    raise ValueError(f"topv: row {b}: an image run of {run.numel()} tokens is not a multiple of "
                                     f"{self.per_tile} tokens per tile")
                out.append(Segment(b, run, self._positions(run.numel() // self.per_tile, input_ids.device)))
        return out


_FAMILIES = {"llava": _Llava, "llava_next": _LlavaNext, "qwen2_vl": _QwenVL, "qwen2_5_vl": _QwenVL,
             "internvl": _InternVL}


def supported_families() -> str:
    return "; ".join(sorted({f"{f.name} ({f.classes})" for f in _FAMILIES.values()}))


# --------------------------------------------------------------------------------------------
# Masks in the format each attention implementation expects
# --------------------------------------------------------------------------------------------


def _is_flash(impl: str) -> bool:
    return "flash" in impl


def _build_mask(valid: torch.Tensor, q: int, impl: str, dtype: torch.dtype):
    """Mask for q queries that are the last q of ``valid.shape[1]`` keys.

    ``valid`` bool (B, kv): key validity. Query i may see key j iff j is valid and j <= its own
    slot; it always sees itself, so a padding query never has an empty row (an empty row is NaN
    under SDPA, and a NaN value leaks through zero attention weights)."""
    if _is_flash(impl):
        return valid.to(torch.int32)  # FlashAttention takes the 2-D padding mask and unpads with it
    kv = valid.shape[1]
    qpos = torch.arange(kv - q, kv, device=valid.device)[:, None]
    kpos = torch.arange(kv, device=valid.device)[None, :]
    allowed = (valid[:, None, :] & (kpos <= qpos)[None]) | (kpos == qpos)[None]
    allowed = allowed[:, None]  # (B, 1, q, kv)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (..., B or 1, T, d) along its sequence dim (-2) with ``index`` (B, L)."""
    B, L = index.shape
    shape = list(t.shape)
    shape[-3] = B
    t = t.expand(shape)
    idx = index.view(*([1] * (t.dim() - 3)), B, L, 1).expand(*shape[:-2], L, shape[-1])
    return t.gather(-2, idx)


# --------------------------------------------------------------------------------------------
# The session: one per model instance
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Prefill:
    segments: list[Segment]
    attn2d: torch.Tensor | None
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    subst: dict | None = None  # kwargs every layer > K receives
    info: PrefillInfo | None = None
    all_valid: bool = False  # no padding slot in the pruned sequence
    skip: bool = False  # every image keeps all its tokens: run the model untouched


@dataclass(eq=False)
class _Decode:
    record: _Record
    mask: object


class TopVSession:
    """The hooks of one :func:`apply` on one model. ``last`` is the :class:`PrefillInfo` of the
    most recent pruned prefill."""

    def __init__(self, model, family: _Family, cfg: TopVConfig):
        self.model = model
        self.family = family
        self.cfg = cfg
        self.lm = family.language_model()
        self.layers = self.lm.layers
        self.n_layers = len(self.layers)
        self.impl = self.lm.config._attn_implementation
        self.handles = []
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last: PrefillInfo | None = None
        # When True, the device is synchronised around the scoring (gather + topv.prune) so that
        # PrefillInfo.prune_seconds is its device time; otherwise it is host time only.
        self.sync_timing = False
        # A fixed image layout used for every prefill instead of reading it off input_ids (which
        # syncs the host): set it to ``family.segments(...)`` of a fixed-shape request to capture
        # the language model's prefill in a CUDA graph (with check_finite=False).
        self.fixed_segments: list[Segment] | None = None
        self._pending: tuple | None = None  # (input_ids, VLM kwargs) of a prefill
        self._prefill: _Prefill | None = None
        self._decode: _Decode | None = None

    # ---- install / uninstall ----------------------------------------------------------------

    def install(self):
        K = self.cfg.layer
        h = self.handles
        h.append(self.model.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True, always_call=True))
        for i, layer in enumerate(self.layers):
            h.append(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
        h.append(self.layers[K].post_attention_layernorm.register_forward_hook(self._capture_target))

    def uninstall(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._pending = self._prefill = self._decode = None

    # ---- budgets ----------------------------------------------------------------------------

    def budget(self, n: int) -> int:
        if self.cfg.keep is not None:
            return min(self.cfg.keep, n)
        return min(n, max(1, math.floor(self.cfg.keep_ratio * n + 0.5)))

    # ---- hooks ------------------------------------------------------------------------------

    @staticmethod
    def _cache_of(kwargs):
        c = kwargs.get("cache")
        return kwargs.get("past_key_values") if c is None else c

    def _vlm_pre(self, module, args, kwargs):
        self._pending = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = self._cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            # Decoding (or continuing a conversation): no new prefill to prune.
            record = self.records.get(cache)
            if (record is not None and len(record.pruned_layers) == self.n_layers
                    and kwargs.get("position_ids") is None and kwargs.get("attention_mask") is None):
                # kv="all": the model would read positions off the pruned cache; give the ones
                # the unpruned model reads off its full cache.
                inp = input_ids if input_ids is not None else kwargs["inputs_embeds"]
                pos = self.family.decode_positions(record, cache.get_seq_length(), inp.shape[0], inp.shape[1],
                                                   inp.device)
                if pos is not None:
                    kwargs["position_ids"] = pos
                    return args, kwargs
            return None
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError("topv: the prefill was given inputs_embeds without input_ids; TopV needs input_ids "
                                 "to find the image tokens")
            return None
        self._pending = (input_ids, kwargs)
        return None

    def _lm_pre(self, module, args, kwargs):
        self._prefill = self._decode = None
        cache = self._cache_of(kwargs)
        record = self.records.get(cache) if cache is not None else None
        if record is not None and cache.get_seq_length() == 0:
            del self.records[cache]  # the cache was reset: a new request starts on it
            record = None
        if record is not None:
            return self._start_decode(record, cache, args, kwargs)
        pending, self._pending = self._pending, None
        if self.fixed_segments is not None and (cache is None or cache.get_seq_length() == 0):
            segs = self.fixed_segments
        elif pending is None:
            return None
        else:
            segs = self.family.segments(pending[0], pending[1], kwargs.get("inputs_embeds"))
        if not segs:
            return None
        if cache is not None and (getattr(cache, "is_compileable", False) or not hasattr(cache, "layers")):
            raise ValueError(f"topv: pruning needs a dynamic cache (its layers grow per layer); got "
                             f"{type(cache).__name__}")
        attn = kwargs.get("attention_mask")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 2):
            raise ValueError("topv: the prefill needs a 2-D attention_mask (or None); got "
                             f"{type(attn).__name__} {getattr(attn, 'shape', '')}")
        skip = all(self.budget(s.token_index.numel()) == s.token_index.numel() for s in segs)
        self._prefill = _Prefill(segs, attn, skip=skip)
        return None

    def _start_decode(self, record: _Record, cache, args, kwargs):
        inp = kwargs.get("inputs_embeds")
        if inp is None:
            inp = kwargs.get("input_ids")
        q = inp.shape[1]
        past = cache.get_seq_length(self.n_layers - 1)  # L' + tokens decoded so far
        new = past - record.pruned_length + q
        attn = kwargs.get("attention_mask")
        B = record.valid.shape[0]
        if attn is None:
            new_valid = torch.ones(B, new, dtype=torch.bool, device=record.valid.device)
        else:
            if not isinstance(attn, torch.Tensor) or attn.dim() != 2:
                raise ValueError("topv: decoding on a pruned cache needs a 2-D attention_mask (or None); got "
                                 f"{type(attn).__name__} {getattr(attn, 'shape', '')}")
            if attn.shape[1] != record.input_length + new:
                raise ValueError(f"topv: attention_mask has {attn.shape[1]} columns; the unpruned request is "
                                 f"{record.input_length} prefill + {new} new tokens")
            new_valid = attn[:, record.input_length:].bool()
        valid = torch.cat([record.valid, new_valid], dim=1)
        # One new token and no padding anywhere: it sees every key, which SDPA does without a
        # mask (the unpruned model's fast path). The check on the new columns costs a sync per
        # step only when a mask was passed (generate already syncs every step).
        if (self.impl == "sdpa" and q == 1 and record.all_valid
                and (attn is None or bool(new_valid.all()))):
            mask = None
        else:
            mask = _build_mask(valid, q, self.impl, self._dtype())
        self._decode = _Decode(record, mask)
        if len(record.pruned_layers) == self.n_layers:
            # Every layer holds the pruned prefix: hand the model a mask of that one length so the
            # masks and positions it derives are consistent, and positions that would be read off
            # the (shorter) cache are given explicitly, as the unpruned model would have them.
            if attn is not None:
                kwargs["attention_mask"] = valid.to(attn.dtype)
            if kwargs.get("position_ids") is None:
                start = record.input_length + new - q
                pos = torch.arange(start, start + q, device=valid.device).unsqueeze(0).expand(B, -1)
                kwargs["position_ids"] = pos
            return args, kwargs
        return None

    def _dtype(self):
        return next(self.lm.parameters()).dtype

    def _capture_target(self, module, args, output):
        p = self._prefill
        if p is not None and not p.skip and p.target is None:
            p.target = output

    def _make_layer_pre(self, i: int):
        K = self.cfg.layer

        def hook(module, args, kwargs):
            p = self._prefill
            if p is not None and not p.skip:
                if i == K:
                    p.source = args[0] if args else kwargs["hidden_states"]
                    return None
                if i == K + 1:
                    return self._prune(args, kwargs)
                if i > K + 1:
                    kwargs.update(p.subst)
                    return args, kwargs
                return None
            d = self._decode
            if d is not None and i in d.record.pruned_layers:
                kwargs["attention_mask"] = d.mask
                if _is_flash(self.impl):
                    kwargs["position_ids"] = None  # gapped positions would look like packed sequences
                return args, kwargs
            return None

        return hook

    def _prune(self, args, kwargs):
        p = self._prefill
        hs = args[0] if args else kwargs["hidden_states"]
        B, T, d = hs.shape
        if p.source is None or p.target is None:
            raise RuntimeError("topv: layer K's input or post_attention_layernorm output was not captured")
        segs = p.segments
        keeps = [self.budget(s.token_index.numel()) for s in segs]
        if self.sync_timing and hs.is_cuda:
            torch.cuda.synchronize(hs.device)
        t0 = time.perf_counter()
        kept = self.score(p, segs, keeps)
        if self.sync_timing and hs.is_cuda:
            torch.cuda.synchronize(hs.device)
        prune_seconds = time.perf_counter() - t0
        # Map packed kept indices back to (row, token) and build the keep mask.
        token_of = torch.cat([s.token_index for s in segs])
        row_of = torch.cat([torch.full_like(s.token_index, s.row) for s in segs])
        keep = torch.ones(B, T, dtype=torch.bool, device=hs.device)
        # Device-side fill values: a Python bool would be copied from the host, which CUDA-graph
        # capture forbids.
        keep.index_put_((row_of, token_of), torch.zeros((), dtype=torch.bool, device=hs.device))
        keep.index_put_((row_of[kept], token_of[kept]), torch.ones((), dtype=torch.bool, device=hs.device))
        # L' follows from the host-side budgets, so no device sync is needed.
        dropped = [0] * B
        for s, k in zip(segs, keeps):
            dropped[s.row] += s.token_index.numel() - k
        lengths = keep.sum(1)  # equals T - dropped; computed on the device (no host-to-device copy)
        Lp = T - min(dropped)
        # Kept indices first, in order (a stable sort of the "dropped" flag); each row is
        # right-aligned in the L' slots, so the last token stays last (what generate reads) and
        # the slots added to align rows come first, masked out like left padding.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        slot = torch.arange(Lp, device=hs.device)[None, :] - (Lp - lengths)[:, None]
        slot_valid = slot >= 0
        index = order.gather(1, slot.clamp(min=0))
        valid_in = torch.ones(B, T, dtype=torch.bool, device=hs.device) if p.attn2d is None else p.attn2d.bool()
        valid = valid_in.gather(1, index) & slot_valid
        new_hs = hs.gather(1, index[..., None].expand(B, Lp, d))
        # With no padding left, SDPA gets no mask (its causal fast path, as the unpruned model
        # would); known on the host when nothing was padded, else one sync outside graph capture.
        all_valid = p.attn2d is None and len(set(dropped)) == 1
        if not all_valid and not (hs.is_cuda and torch.cuda.is_current_stream_capturing()):
            all_valid = bool(valid.all())
        p.all_valid = all_valid
        mask = None if all_valid and self.impl == "sdpa" else _build_mask(valid, Lp, self.impl, hs.dtype)
        subst = {"attention_mask": mask}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            subst["position_embeddings"] = tuple(_gather_seq(t, index) for t in pe)
        pid = kwargs.get("position_ids")
        if _is_flash(self.impl):
            subst["position_ids"] = None  # gapped positions would look like packed sequences
        elif pid is not None:
            subst["position_ids"] = pid.expand(*pid.shape[:-2], B, T).gather(-1, index.expand(*pid.shape[:-2], B, Lp))
        p.subst = subst
        kept_lists, off = [], 0
        for k in keeps:
            kept_lists.append(token_of[kept[off:off + k]])
            off += k
        p.info = PrefillInfo(T, Lp, segs, keeps, kept_lists, index, valid,
                             prune_seconds=prune_seconds)
        kwargs.update(subst)
        if args:
            args = (new_hs, *args[1:])
        else:
            kwargs["hidden_states"] = new_hs
        return args, kwargs

    def score(self, p: _Prefill, segs: list[Segment], keeps: list[int]) -> torch.Tensor:
        """Kept indices into the packed visual tokens of ``segs`` (ascending within each
        segment, segments in order): TopV on layer K's source and target. Baselines override
        this (``topv.integrations.fastv``)."""
        src = torch.cat([p.source[s.row, s.token_index] for s in segs])
        tgt = torch.cat([p.target[s.row, s.token_index] for s in segs])
        pos = torch.cat([s.positions for s in segs])
        lens = [s.token_index.numel() for s in segs]
        kept, _ = topv.prune(src, tgt, pos, keeps, seg_lens=lens, **self.cfg.prune_kwargs)
        return kept

    def _lm_post(self, module, args, kwargs, output):
        p, self._prefill, self._decode = self._prefill, None, None
        if p is None or p.skip or p.info is None or output is None:  # output is None: the forward raised
            return None
        cache = self._cache_of(kwargs)
        if cache is None:
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
        info = p.info
        K = self.cfg.layer
        if cache is not None:
            if self.cfg.kv == "all":
                idx = info.index
                for layer in cache.layers[: K + 1]:
                    H, hd = layer.keys.shape[1], layer.keys.shape[-1]
                    g = idx[:, None, :, None].expand(-1, H, -1, hd)
                    layer.keys = layer.keys.gather(2, g)
                    layer.values = layer.values.gather(2, idx[:, None, :, None].expand(-1, H, -1, layer.values.shape[-1]))
                pruned = frozenset(range(self.n_layers))
            else:
                pruned = frozenset(range(K + 1, self.n_layers))
            self.records[cache] = _Record(info.input_length, info.pruned_length, info.valid, pruned, p.all_valid)
            info.cache_lengths = [cache.get_seq_length(i) for i in range(self.n_layers)]
        self.last = info
        return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_version():
    import transformers

    v = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if v < _MIN_VERSION:
        raise RuntimeError(f"topv's transformers integration needs transformers >= "
                           f"{'.'.join(map(str, _MIN_VERSION))}; found {transformers.__version__}")
    if v > tuple(int(x) for x in _VERIFIED[-1].split(".")[:2]):
        warnings.warn(f"topv: transformers {transformers.__version__} is newer than the versions the integration "
                      f"was verified on ({', '.join(_VERIFIED)})", stacklevel=3)


def apply(model, *, keep_ratio: float | None = None, keep: int | None = None, layer: int = 2, kv: str = "after_k",
          recover_ratio: float = 0.25, alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.3,
          sigma: float = 0.2, eps: float = 0.1, n_iters: int = 3, tol: float = 0.0, check_finite: bool = True,
          backend: str = "auto", _session_cls=None) -> TopVSession:
    """Install TopV on one model instance; undo with :func:`remove`.

    Parameters
    ----------
    model : a supported Hugging Face VLM (see :func:`supported_families`)
    keep_ratio : fraction of each image's scored tokens to keep: ``round(keep_ratio * n)``, at
        least 1 (exact per image). Give this or ``keep``.
    keep : tokens to keep per image (``min(keep, n)``).
    layer : K, the decoder layer whose input and post-attention-norm output are scored; layers
        0..K see every token, layers > K the kept ones. Needs K < num_layers - 1.
    kv : ``"after_k"`` (layers <= K keep every token in the KV cache) or ``"all"`` (after the
        prefill the pruned tokens are evicted from layers <= K too; one length for all layers).
    recover_ratio, alpha, beta, gamma, sigma, eps, n_iters, tol, check_finite, backend :
        passed to :func:`topv.prune` unchanged.

    Returns the :class:`TopVSession` (its ``last`` attribute describes the latest prefill).
    """
    _check_version()
    if (keep_ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of keep_ratio and keep; got keep_ratio={keep_ratio!r}, keep={keep!r}")
    if keep_ratio is not None and not (0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    if kv not in ("after_k", "all"):
        raise ValueError(f"kv must be 'after_k' or 'all', got {kv!r}")
    if getattr(model, _SESSION_ATTR, None) is not None:
        raise RuntimeError("topv is already applied to this model; call topv.remove(model) first")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    fam_cls = _FAMILIES.get(mt)
    if fam_cls is None or not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise TypeError(f"topv supports {supported_families()}; got {type(model).__name__} "
                        f"(model_type {mt!r})")
    family = fam_cls(model)
    n_layers = len(family.language_model().layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not (0 <= layer < n_layers - 1):
        raise ValueError(f"layer must be an integer in [0, {n_layers - 2}] for this {n_layers}-layer model, got {layer!r}")
    impl = family.language_model().config._attn_implementation
    if impl not in ("sdpa", "eager") and not _is_flash(impl):
        raise ValueError(f"topv supports attn_implementation 'sdpa', 'eager' and flash_attention_*; got {impl!r}")
    cfg = TopVConfig(keep_ratio, keep, layer, kv, dict(recover_ratio=recover_ratio, alpha=alpha, beta=beta,
                                                      gamma=gamma, sigma=sigma, eps=eps, n_iters=n_iters, tol=tol,
                                                      check_finite=check_finite, backend=backend))
    session = (_session_cls or TopVSession)(model, family, cfg)
    session.install()
    setattr(model, _SESSION_ATTR, session)
    return session


def remove(model) -> bool:
    """Remove TopV from ``model``; returns False when it was not applied. A cache pruned while TopV
    was on must not be decoded further without it."""
    session = getattr(model, _SESSION_ATTR, None)
    if session is None:
        return False
    session.uninstall()
    delattr(model, _SESSION_ATTR)
    return True


@contextlib.contextmanager
def enable(model, **kwargs):
    """``with topv.enable(model, keep_ratio=0.25): model.generate(...)`` -- :func:`apply` on entry,
    :func:`remove` on exit (also on error). Yields the :class:`TopVSession`."""
    session = apply(model, **kwargs)
    try:
        yield session
    finally:
        remove(model)


def session_of(model) -> TopVSession | None:
    """The active :class:`TopVSession` of ``model``, or None."""
    return getattr(model, _SESSION_ATTR, None)


__all__ = ["apply", "remove", "enable", "session_of", "supported_families", "TopVSession", "PrefillInfo",
           "Segment"]
