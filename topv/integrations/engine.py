"""The hook engine: pruning inside a Hugging Face VLM's forward, for any scorer.

The layer stage: during the prefill, layers 0..K run on every token; at layer K the engine
captures what the scorer needs (``scorers/base.py``), gathers it at each segment's scored tokens,
calls the scorer, and layers K+1.. run on the kept sequence only, every token at its original
position. Decoding then continues on a cache whose layers hold different lengths
(``kv="after_k"``) or one pruned length (``kv="all"``).

The vision stage is the same engine with K = -1 and ``kv="all"``: the source and target come from
the vision encoder (the layer whose output the model uses, mapped to language-model tokens by the
family), so layer 0 already runs on the kept sequence and every layer's cache holds only it.
Positions stay the original ones, or become those of the shortened sequence (``positions=
"compact"``). ``docs/integration.md`` is the full statement.

Forward (pre-)hooks with kwargs on *this model instance's* modules only, nothing patched:

* the VLM (pre-hook): reads a prefill's layout off ``input_ids`` and the processor outputs, with one
  host read, before the language model runs; the layout's device tables come from a cache;
* the language model (pre-hook, hook): starts a prefill or a decode step on a pruned cache; at the
  end evicts the pruned tokens from layers <= K (``kv="all"``) and records the request;
* decoder layer K (pre-hook) and its ``post_attention_layernorm`` (hook): capture the source and the
  target; a scorer that reads attention weights gets layer K's attention run eagerly once;
* decoder layer K+1 (pre-hook): scores, gathers the kept sequence, swaps ``hidden_states``,
  ``attention_mask``, ``position_ids``, ``position_embeddings``; layers > K+1 get the same kwargs;
* vision stage: the encoder layer (pre-hook) and its post-attention norm (hook) capture the source
  and target of every encoder call; where the family needs arguments of the encoder call
  (LLaVA-NeXT's image sizes, which ``generate`` gives the encoder only), this instance's
  ``get_image_features`` is wrapped to copy them.

Inside the language model's forward nothing reads the device (with ``check_finite=False``): every
size is known from the layout, and the kept set becomes slots through fixed-shape ops.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field

import torch

from topv.integrations.families import Family
from topv.integrations.layout import Plan, PlanCache, budget
from topv.integrations.masks import build_mask, gather_positions, gather_seq, is_flash
from topv.integrations.records import PrefillInfo
from topv.integrations.scorers import ScoreBatch, Scorer


@dataclass(frozen=True)
class Settings:
    """One ``apply``'s settings (exactly one of ``keep_ratio`` / ``keep`` is set); ``layer`` is
    the last layer every token passes (the scorer's reading of the user's K; -1 for the vision
    stage, whose ``kv`` is "all"); ``positions`` "original" or "compact" (vision stage only)."""

    keep_ratio: float | None
    keep: int | None
    layer: int
    kv: str
    stage: str = "layer"
    positions: str = "original"


@dataclass(eq=False)
class _Record:
    """Per-request state attached (through a weak dict) to the cache a prefill filled."""

    input_length: int  # N: the unpruned prefill length
    pruned_length: int  # L'
    valid: torch.Tensor  # bool (B, L'): key validity of the pruned prefix
    pruned_layers: frozenset[int]  # layers whose cache holds only the pruned prefix
    all_valid: bool  # no padding slot in the pruned prefix
    compact: bool  # positions follow the pruned sequence, not the unpruned request


@dataclass(eq=False)
class _Prefill:
    plan: Plan
    host_seconds: float = 0.0
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    encoded: list | None = None  # vision stage: (source, target) tokens of each encoder call
    rows: torch.Tensor | None = None  # vision stage: each scored token's row in the encoded tokens
    subst: dict | None = None  # kwargs every layer > K+1 receives
    info: PrefillInfo | None = None


_UNSET = object()


@dataclass(eq=False)
class _Decode:
    record: _Record
    attn: torch.Tensor | None  # the caller's 2-D mask over the unpruned request
    batch: int
    new: int  # tokens after the prefill, these q included
    q: int
    mask: object = field(default=_UNSET)  # built at the first pruned layer, shared by the others


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _cache_of(kwargs):
    # transformers 5.17 names it past_key_values, 5.24 cache.
    c = kwargs.get("cache")
    return kwargs.get("past_key_values") if c is None else c


class TopVSession:
    """The hooks of one ``apply`` on one model. ``last`` is the :class:`PrefillInfo` of the latest
    prefill with images; ``scorer`` the method that ranks tokens."""

    def __init__(self, model, family: Family, scorer: Scorer, settings: Settings):
        self.model, self.family, self.scorer, self.settings = model, family, scorer, settings
        self.lm = family.language_model(model)
        self.layers = self.lm.layers
        self.n_layers = len(self.layers)
        self.impl = self.lm.config._attn_implementation
        self.handles: list = []
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last: PrefillInfo | None = None
        # When True, the device is synchronised around the scorer's call, so that
        # PrefillInfo.score_seconds is its device time (two host syncs per prefill).
        self.sync_timing = False
        # Host time spent in decode-step hooks and the number of steps, for overhead measurements.
        self.decode_host_seconds = 0.0
        self.decode_steps = 0
        # When True, the prefill's device work runs inside torch.profiler ranges named
        # "topv::step", so that a profiler can attribute kernels to it (bench/bench_e2e.py).
        self.profile = False
        self._plans = PlanCache()
        self._pinned: Plan | None = None
        self._pending: tuple | None = None  # (plan, host seconds) of the layout read at the VLM pre-hook
        self._pending_inputs: tuple | None = None  # (input_ids, inputs) when the layout needs the embeddings
        self._prefill: _Prefill | None = None
        self._decode: _Decode | None = None
        self._eager_attn = None  # (module, its own config) while layer K's attention runs eagerly
        # Vision stage: what the encoder produced since the last prefill (it runs before the
        # prefill's forward under generate, inside it otherwise), and the host time that took.
        self._encoded: list = []
        self._calls: list = []
        self._vision_source: torch.Tensor | None = None
        self._encoder_host = 0.0
        self._wrapped = None  # (module, wrapper) while get_image_features is wrapped

    # ---- install / uninstall ----------------------------------------------------------------

    @property
    def vision(self) -> bool:
        return self.settings.stage == "vision"

    def install(self):
        K = self.settings.layer
        h = self.handles
        h.append(self.model.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        h.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True, always_call=True))
        # Layers < K see every token in the prefill and keep their own masks in decode: no hooks.
        for i in range(max(K, 0), self.n_layers):
            h.append(self.layers[i].register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
        if self.vision:
            layer, norm = self.family.vision_layer(self.model)
            h.append(layer.register_forward_pre_hook(self._capture_vision_source, with_kwargs=True))
            h.append(norm.register_forward_hook(self._capture_vision_target))
            if self.family.encoder_inputs:
                self._wrap_encoder()
            return
        if "target" in self.scorer.needs:
            h.append(self.layers[K].post_attention_layernorm.register_forward_hook(self._capture_target))
        if "attention" in self.scorer.needs:
            h.append(self.layers[K].self_attn.register_forward_hook(self._capture_attention))

    def uninstall(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._restore_attention()
        if self._wrapped is not None:
            owner, wrapper = self._wrapped
            if owner.__dict__.get("get_image_features") is wrapper:
                del owner.get_image_features  # the class's method again
            self._wrapped = None
        self._pending = self._pending_inputs = self._prefill = self._decode = self._vision_source = None
        self._encoded, self._calls, self._encoder_host = [], [], 0.0

    def _wrap_encoder(self):
        """Copy the arguments the family reads off each encoder call (``family.encoder_inputs``) to
        the host, on this instance's ``get_image_features`` (the one ``generate`` and the forward
        call). The encoder reads them on the host itself at that point."""
        owner = self.model.model
        original = owner.get_image_features
        signature = inspect.signature(original)
        names = self.family.encoder_inputs

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments
            self._calls.append({k: torch.as_tensor(given[k]).cpu() for k in names if given.get(k) is not None})
            return original(*args, **kwargs)

        owner.get_image_features = get_image_features
        self._wrapped = (owner, get_image_features)

    # ---- layouts ----------------------------------------------------------------------------

    def budgets(self, lengths: list[int]) -> list[int]:
        return [budget(n, self.settings.keep_ratio, self.settings.keep) for n in lengths]

    def plan(self, input_ids: torch.Tensor, inputs: dict, embeds: torch.Tensor | None = None) -> Plan | None:
        """The layout of a prefill with these inputs (the VLM's keyword inputs; ``embeds`` those
        entering the language model, where the family reads the layout off them), from the cache
        when seen before; None when it holds no image. Device tensors are read with one host copy."""
        wanted = {k: inputs.get(k) for k in self.family.inputs}
        if embeds is not None and self.family.reads_embeds(inputs):
            wanted.update(self.family.embed_inputs(embeds))
        host = _to_host({"input_ids": input_ids, "attention_mask": inputs.get("attention_mask"), **wanted})
        ids, attn = host.pop("input_ids"), host.pop("attention_mask")
        key = tuple((k, None if t is None else (tuple(t.shape), t.numpy().tobytes()))
                    for k, t in (("input_ids", ids), ("attention_mask", attn), *sorted(host.items())))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        segments = self.family.segments(ids, host)
        if not segments:
            return None
        plan = Plan(segments, self.budgets([s.token_index.numel() for s in segments]), ids.shape[0], ids.shape[1],
                    attn, input_ids.device)
        if not plan.skip:
            self.scorer.prepare(ScoreBatch(plan.lengths, plan.keeps, plan.positions, tables=plan.score_tables))
        return self._plans.put(key, plan)

    def pin_layout(self, inputs: dict | None, embeds: torch.Tensor | None = None) -> None:
        """Use the layout of ``inputs`` (the VLM's keyword inputs) for every prefill, without reading
        anything off the device: what capturing the language model's prefill in a CUDA graph needs
        (with ``check_finite=False``). ``None`` unpins."""
        if inputs is None:
            self._pinned = None
            return
        if self.family.reads_embeds(inputs) and embeds is None:
            raise ValueError(f"topv: {self.family.name} needs the embeddings to read this layout; pass embeds= "
                             "or inputs with the processor's outputs")
        self._pinned = self.plan(inputs["input_ids"], inputs, embeds)

    # ---- hooks ------------------------------------------------------------------------------

    def _vlm_pre(self, module, args, kwargs):
        t0 = time.perf_counter()
        self._pending = self._pending_inputs = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            out = self._decode_positions(cache, input_ids, args, kwargs)
            self._count_decode(t0)
            return out
        if self.vision:
            self._check_vision_call(kwargs)
        if self._pinned is not None:
            return None
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError("topv: the prefill was given inputs_embeds without input_ids; TopV needs input_ids "
                                 "to find the image tokens")
            return None
        if self.family.reads_embeds(kwargs):
            self._pending_inputs = (input_ids, kwargs)  # read when the embeddings reach the language model
        else:
            plan = self.plan(input_ids, kwargs)
            self._pending = None if plan is None else (plan, time.perf_counter() - t0)
        return None

    def _check_vision_call(self, kwargs):
        """A forward that brings pixels runs the encoder now: what an earlier encoder call left is
        stale. The capture layer was chosen from the config's ``vision_feature_layer``."""
        if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            self._encoded, self._calls, self._encoder_host = [], [], 0.0
        layer = kwargs.get("vision_feature_layer")
        if layer is not None and layer != getattr(self.model.config, "vision_feature_layer", layer):
            raise ValueError(f"topv: stage='vision' scores the encoder layer of the config's vision_feature_layer "
                             f"({self.model.config.vision_feature_layer}); this call asks for {layer!r}")

    def _decode_positions(self, cache, input_ids, args, kwargs):
        """kv="all", a caller that passes no positions: the model would read them off the pruned
        cache; hand it those the unpruned model reads off its full one (M-RoPE families here, where
        the VLM derives them; plain RoPE at the language model's pre-hook). Compacted positions are
        set at the language model's pre-hook."""
        record = self.records.get(cache)
        if (record is None or len(record.pruned_layers) < self.n_layers or record.compact
                or kwargs.get("position_ids") is not None):
            return None
        inp = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        start = record.input_length + cache.get_seq_length() - record.pruned_length
        pos = self.family.decode_positions(self.model, start, inp.shape[0], inp.shape[1], inp.device)
        if pos is None:
            return None
        kwargs["position_ids"] = pos
        return args, kwargs

    def _count_decode(self, t0):
        self.decode_host_seconds += time.perf_counter() - t0

    def _lm_pre(self, module, args, kwargs):
        t0 = time.perf_counter()
        self._prefill = self._decode = None
        encoded, calls, encoder_host = self._encoded, self._calls, self._encoder_host
        self._encoded, self._calls, self._encoder_host = [], [], 0.0
        cache = _cache_of(kwargs)
        record = self.records.get(cache) if cache is not None else None
        if record is not None and cache.get_seq_length() == 0:
            del self.records[cache]  # the cache was reset: a new request starts on it
            record = None
        if record is not None:
            out = self._start_decode(record, cache, args, kwargs)
            self.decode_steps += 1
            self._count_decode(t0)
            return out
        host = 0.0
        if self._pinned is not None and (cache is None or cache.get_seq_length() == 0):
            plan = self._pinned
        elif self._pending is not None:
            plan, host = self._pending
        elif self._pending_inputs is not None:
            ids, vlm_kwargs = self._pending_inputs
            plan = self.plan(ids, vlm_kwargs, kwargs.get("inputs_embeds"))
        else:
            plan = None
        self._pending = self._pending_inputs = None
        if plan is None:
            return None
        if cache is not None and (getattr(cache, "is_compileable", False) or not hasattr(cache, "layers")):
            raise ValueError(f"topv: pruning needs a dynamic cache (its layers grow per layer); got "
                             f"{type(cache).__name__}")
        attn = kwargs.get("attention_mask")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 2):
            raise ValueError("topv: the prefill needs a 2-D attention_mask (or None); got "
                             f"{type(attn).__name__} {getattr(attn, 'shape', '')}")
        emb = kwargs.get("inputs_embeds")
        if emb is not None and tuple(emb.shape[:2]) != (plan.batch, plan.input_length):
            raise ValueError(f"topv: the layout was read for inputs of shape {(plan.batch, plan.input_length)}; the "
                             f"language model got {tuple(emb.shape[:2])}")
        p = _Prefill(plan)
        if self.vision and not plan.skip:
            p.encoded, p.rows = encoded, self._vision_rows(plan, encoded, calls)
            host += encoder_host
        p.host_seconds = host + time.perf_counter() - t0
        self._prefill = p
        return None

    def _vision_rows(self, plan: Plan, encoded: list, calls: list) -> torch.Tensor:
        """Each scored token's row in the encoder calls' tokens (built once per layout and call
        inputs); checks that the encoder ran for exactly these images, by shapes only."""
        if not encoded:
            raise RuntimeError("topv: stage='vision' scores the vision encoder's states, but the encoder did not run "
                               "under topv for this prefill (were the images encoded before topv.apply?)")
        key = tuple(tuple((k, tuple(v.shape), v.numpy().tobytes()) for k, v in sorted(c.items())) for c in calls)
        rows = plan.vision_rows.get(key)
        if rows is None:
            index, total = self.family.vision_rows(plan.segments, calls)
            rows = plan.vision_rows[key] = (index.to(plan.device, non_blocking=True), total)
        got = sum(source.shape[0] for source, _ in encoded)
        if got != rows[1]:
            raise ValueError(f"topv: the vision encoder gave {got} language-model tokens for this prefill; its "
                             f"{len(plan.segments)} images and videos need {rows[1]}")
        return rows[0]

    def _start_decode(self, record: _Record, cache, args, kwargs):
        inp = kwargs.get("inputs_embeds")
        if inp is None:
            inp = kwargs.get("input_ids")
        B, q = inp.shape[:2]
        new = cache.get_seq_length(self.n_layers - 1) - record.pruned_length + q  # tokens after the prefill
        attn = kwargs.get("attention_mask")
        if attn is not None:
            if not isinstance(attn, torch.Tensor) or attn.dim() != 2:
                raise ValueError("topv: decoding on a pruned cache needs a 2-D attention_mask (or None); got "
                                 f"{type(attn).__name__} {getattr(attn, 'shape', '')}")
            if attn.shape[1] != record.input_length + new:
                raise ValueError(f"topv: attention_mask has {attn.shape[1]} columns; the unpruned request is "
                                 f"{record.input_length} prefill + {new} new tokens")
        if len(record.pruned_layers) == self.n_layers:
            # kv="all": every layer holds the pruned prefix. Hand the model a mask of that length
            # (it then builds every layer's mask itself) and the positions it would otherwise read
            # off the shorter cache, as the unpruned model has them.
            if attn is not None:
                kwargs["attention_mask"] = torch.cat([record.valid.to(attn.dtype), attn[:, record.input_length:]], 1)
            elif not record.all_valid:
                kwargs["attention_mask"] = torch.cat([record.valid, record.valid.new_ones(B, new)], 1).long()
            given = kwargs.get("position_ids")
            if record.compact:  # after the pruned prefix, whatever the caller computed from the request
                start = record.pruned_length + new - q
                pos = torch.arange(start, start + q, device=inp.device)
                kwargs["position_ids"] = pos.expand(B, q) if given is None else pos.expand(given.shape)
            elif given is None:
                start = record.input_length + new - q
                kwargs["position_ids"] = torch.arange(start, start + q, device=inp.device).unsqueeze(0).expand(B, -1)
            return args, kwargs
        # kv="after_k": layers <= K use the model's own masks; the pruned ones get theirs, built at
        # the first of them.
        self._decode = _Decode(record, attn, B, new, q)
        return None

    def _capture_vision_source(self, module, args, kwargs):
        self._vision_source = _hidden(args, kwargs)

    def _capture_vision_target(self, module, args, output):
        t0 = time.perf_counter()
        with self._range():
            source, self._vision_source = self._vision_source, None
            self._encoded.append((self.family.vision_tokens(source), self.family.vision_tokens(output)))
        self._encoder_host += time.perf_counter() - t0

    def _capture_target(self, module, args, output):
        p = self._prefill
        if p is not None and not p.plan.skip and p.target is None:
            p.target = output

    def _capture_attention(self, module, args, output):
        p = self._prefill
        if p is None or p.plan.skip or self._eager_attn is None:
            return
        self._restore_attention()
        w = output[1]  # (B, H, T, T): eager attention weights
        B, H, _, T = w.shape
        last = p.plan.last_token.view(B, 1, 1, 1).expand(B, H, 1, T)
        p.attention = w.gather(2, last).squeeze(2).float().mean(1)  # (B, T): the last real token's row

    def _restore_attention(self):
        if self._eager_attn is not None:
            module, config = self._eager_attn
            module.config = config
            self._eager_attn = None

    def _make_layer_pre(self, i: int):
        K = self.settings.layer
        needs = self.scorer.needs

        def hook(module, args, kwargs):
            p = self._prefill
            if p is not None and not p.plan.skip:
                if i == K:
                    t0 = time.perf_counter()
                    if "source" in needs:
                        p.source = _hidden(args, kwargs)
                    if "attention" in needs:
                        self._run_attention_eagerly(module, p, kwargs, _hidden(args, kwargs).dtype)
                    p.host_seconds += time.perf_counter() - t0
                    return args, kwargs
                if i == K + 1:
                    with self._range():
                        return self._prune(args, kwargs)
                t0 = time.perf_counter()
                kwargs.update(p.subst)
                p.host_seconds += time.perf_counter() - t0
                return args, kwargs
            d = self._decode
            if d is not None and i > K:
                t0 = time.perf_counter()
                if d.mask is _UNSET:
                    d.mask = self._decode_mask(d, kwargs.get("attention_mask"), _hidden(args, kwargs).dtype)
                kwargs["attention_mask"] = d.mask
                if is_flash(self.impl):
                    kwargs["position_ids"] = None  # gapped positions would look like packed sequences
                self._count_decode(t0)
                return args, kwargs
            return None

        return hook

    def _decode_mask(self, d: _Decode, model_mask, dtype):
        # The model's own mask is None only when it saw no padding and needs none (one query,
        # SDPA or FlashAttention): then the pruned layers need none either, unless the pruned
        # prefix has alignment slots. Reading that off the model costs no host sync.
        if model_mask is None and d.record.all_valid:
            return None
        r = d.record
        new = d.attn[:, r.input_length:].bool() if d.attn is not None else r.valid.new_ones(d.batch, d.new)
        return build_mask(torch.cat([r.valid, new], 1), d.q, self.impl, dtype)

    def _run_attention_eagerly(self, layer, p: _Prefill, kwargs, dtype):
        attn = layer.self_attn
        eager = copy.copy(attn.config)
        eager._attn_implementation = "eager"
        self._eager_attn = (attn, attn.config)
        attn.config = eager  # this module only, this prefill only: its attention reads its own config
        kwargs["attention_mask"] = p.plan.eager_mask(dtype)

    def _prune(self, args, kwargs):
        t0 = time.perf_counter()
        p = self._prefill
        plan = p.plan
        hs = _hidden(args, kwargs)
        B, T = hs.shape[:2]
        needs = self.scorer.needs
        if p.encoded is None and (("source" in needs and p.source is None) or ("target" in needs and p.target is None)
                                  or ("attention" in needs and p.attention is None)):
            raise RuntimeError(f"topv: layer {self.settings.layer}'s {sorted(needs)} were not captured")
        flat = plan.flat_scored
        if p.encoded is not None:  # vision stage: the encoder's tokens, in the plan's order
            source, target = (torch.cat(x) if len(x) > 1 else x[0] for x in zip(*p.encoded))
            batch = ScoreBatch(plan.lengths, plan.keeps, plan.positions, source=source.index_select(0, p.rows),
                               target=target.index_select(0, p.rows), tables=plan.score_tables)
        else:
            batch = ScoreBatch(plan.lengths, plan.keeps, plan.positions,
                               source=None if p.source is None else p.source.reshape(B * T, -1).index_select(0, flat),
                               target=None if p.target is None else p.target.reshape(B * T, -1).index_select(0, flat),
                               attention=None if p.attention is None else p.attention.reshape(-1).index_select(0, flat),
                               tables=plan.score_tables)
        p.source = p.target = p.attention = p.encoded = None
        if self.sync_timing and hs.is_cuda:
            torch.cuda.synchronize(hs.device)
        t1 = time.perf_counter()
        kept, scores = self.scorer.score(batch)
        if self.sync_timing and hs.is_cuda:
            torch.cuda.synchronize(hs.device)
        score_seconds = time.perf_counter() - t1
        # Kept positions -> slots: the kept tokens of a row, in order, right-aligned in L' slots
        # (the slots that align rows come first, masked like left padding, so the last prompt token
        # stays last, which generate reads); rank = running count of kept tokens, and slot j holds
        # the token where the rank first reaches want[j].
        keep = plan.keep_base.clone().index_fill_(0, flat[kept], True)
        index = torch.searchsorted(keep.view(B, T).cumsum(1), plan.want)
        flat_index = index + plan.row_start
        new_hs = gather_seq(hs, index, flat_index)
        subst = {"attention_mask": plan.mask(self.impl, hs.dtype)}
        pe = kwargs.get("position_embeddings")
        pid = kwargs.get("position_ids")
        if self.settings.positions == "compact":
            # The positions of the pruned sequence itself: slot j at j, on every M-RoPE axis.
            slots = torch.arange(plan.pruned_length, device=hs.device).expand(B, -1)
            subst["position_embeddings"] = self.lm.rotary_emb(
                new_hs, slots if self.family.rope_axes == 1 else slots.expand(self.family.rope_axes, B, -1))
            if pid is not None:
                pid = slots.expand(*pid.shape[:-2], B, -1)
        else:
            if pe is not None:
                subst["position_embeddings"] = tuple(gather_seq(t, index, flat_index) for t in pe)
            if pid is not None:
                pid = gather_positions(pid, index)
        if is_flash(self.impl):
            subst["position_ids"] = None  # gapped positions would look like packed sequences
        elif pid is not None:
            subst["position_ids"] = pid
        p.subst = subst
        p.info = PrefillInfo(
            method=self.scorer.name, input_length=T, pruned_length=plan.pruned_length, segments=plan.segments,
            keep_counts=plan.keeps, kept=list(torch.split(plan.tok_scored[kept], plan.keeps)),
            scores=None if scores is None else list(torch.split(scores, plan.lengths)), index=index,
            valid=plan.valid, score_seconds=score_seconds, stage=self.settings.stage)
        kwargs.update(subst)
        if args:
            args = (new_hs, *args[1:])
        else:
            kwargs["hidden_states"] = new_hs
        p.host_seconds += time.perf_counter() - t0 - (score_seconds if self.sync_timing else 0.0)
        return args, kwargs

    def _range(self):
        return torch.profiler.record_function("topv::step") if self.profile else contextlib.nullcontext()

    def _lm_post(self, module, args, kwargs, output):
        with self._range():
            return self._finish(kwargs, output)

    def _finish(self, kwargs, output):
        t0 = time.perf_counter()
        self._restore_attention()
        p, d, self._prefill, self._decode = self._prefill, self._decode, None, None
        if p is None:
            if d is not None:
                self._count_decode(t0)
            return None
        if output is None:  # the forward raised
            return None
        plan = p.plan
        info = p.info if not plan.skip else self._untouched(plan)
        cache = _cache_of(kwargs)
        if cache is None:
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
        if cache is not None and not plan.skip:
            K = self.settings.layer
            if self.settings.kv == "all":
                idx = info.index
                for layer in cache.layers[: K + 1]:
                    layer.keys, layer.values = _gather_steps(layer.keys, idx), _gather_steps(layer.values, idx)
                pruned = frozenset(range(self.n_layers))
            else:
                pruned = frozenset(range(K + 1, self.n_layers))
            self.records[cache] = _Record(info.input_length, info.pruned_length, plan.valid, pruned, plan.all_valid,
                                          self.settings.positions == "compact")
        if cache is not None:
            info.cache_lengths = [cache.get_seq_length(i) for i in range(self.n_layers)]
        info.host_seconds = p.host_seconds + time.perf_counter() - t0
        self.last = info
        return None

    def _untouched(self, plan: Plan) -> PrefillInfo:
        """The record of a prefill whose budgets kept every token (the forward ran untouched)."""
        B, T = plan.batch, plan.input_length
        index = torch.arange(T, device=plan.device).expand(B, T)
        return PrefillInfo(method=self.scorer.name, input_length=T, pruned_length=T, segments=plan.segments,
                           keep_counts=plan.keeps, kept=list(torch.split(plan.tok_scored, plan.lengths)), scores=None,
                           index=index, valid=plan.valid_in, pruned=False, stage=self.settings.stage)


def _gather_steps(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A cache layer's keys or values (B, heads, T, d) at the slots ``index`` (B, L') of the pruned sequence."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))


def _to_host(tensors: dict) -> dict:
    """The given integer tensors on the host, with one device-to-host copy for all of them (the
    one host read of a prefill's layout)."""
    on_device = [(k, t) for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
    out = {k: t for k, t in tensors.items() if not (isinstance(t, torch.Tensor) and t.device.type != "cpu")}
    if on_device:
        flat = torch.cat([t.reshape(-1).to(torch.int64) for _, t in on_device]).cpu()
        for (k, t), part in zip(on_device, torch.split(flat, [t.numel() for _, t in on_device])):
            out[k] = part.view(t.shape).to(t.dtype)
    return out
