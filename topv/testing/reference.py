"""A slow, obviously correct model of what pruning does to one prompt, given the kept tokens.

It runs the decoder layers of the language model by hand, one unpadded prompt at a time, on
explicit sequences with explicit additive masks and explicit positions, and recomputes the logits
from scratch (no KV cache) for the prefill and for every decode step. The tests compare the hooked
model (batched, padded, with a cache, under SDPA/eager/FlashAttention) against it, for every
scorer: the kept set is an input here, and :func:`reference_kept` recomputes it independently for
the methods whose choice is a function of layer K's states.

For a prompt of N tokens followed by G generated tokens, with K the last layer every token passes:

* layers 0..K run on all N + G tokens. A prompt token sees the prompt tokens before it. A
  generated token sees every prompt token (``kv="after_k"``) or only the kept ones (``kv="all"``:
  the pruned ones were evicted from those layers' caches), and the generated tokens up to itself.
* layers K+1.. run on [text tokens and kept visual tokens of the prompt, in order] + generated
  tokens with a plain causal mask; every token keeps its original (M-)RoPE position, or (compact
  positions) the sequence gets 0, 1, 2, ... on every axis.

The vision stage is K = -1: every layer runs on the shortened sequence. Its kept set is a function
of the vision encoder's states, which :func:`vision_states` recomputes for one prompt with the
model's own code for turning patches into language-model tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import topv
from topv.reference import uniform_indices


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    m = torch.zeros(allowed.shape, dtype=dtype)
    return m.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@contextlib.contextmanager
def eager_attention(model):
    """Every attention of ``model`` runs eager inside the block (the reference's explicit
    additive masks are in eager's format), whatever the model was loaded with."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    attr = "_attn_implementation_internal"
    saved = {k: getattr(c, attr, None) for k, c in configs.items()}
    try:
        for c in configs.values():
            setattr(c, attr, "eager")
        yield
    finally:
        for k, c in configs.items():
            setattr(c, attr, saved[k])


@dataclass
class Prompt:
    """What enters the language model for one unpadded prompt (batch 1)."""

    embeds: torch.Tensor  # (N, d)
    positions: torch.Tensor  # (N,) or (3, N) for M-RoPE


@torch.no_grad()
def capture_prompt(model, inputs: dict) -> Prompt:
    """Run the unmodified model once on one unpadded prompt (batch 1), no cache."""
    lm = model.model.language_model
    got = {}

    def pre(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]
        got["pos"] = kwargs.get("position_ids")

    h = lm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        h.remove()
    emb, pos = got["embeds"][0], got["pos"]
    if pos is None:
        pos = torch.arange(emb.shape[0])
    elif pos.dim() == 3:  # M-RoPE: (3, 1, N), or (4, 1, N) with the text positions first
        pos = pos[-3:, 0]
    else:
        pos = pos[0]
    return Prompt(emb, pos)


def _rope(lm, x, p):
    pid = p.view(1, -1) if p.dim() == 1 else p.view(3, 1, -1)
    return lm.rotary_emb(x[None], pid)


@dataclass
class LayerStates:
    """Layer K of one prompt under a plain causal mask: ``source`` its input (N, d), ``target`` its
    post-attention-norm output (N, d), ``attention`` the last prompt token's attention weights in
    that layer, averaged over heads (N,). :func:`vision_states` fills the first two from the vision
    encoder instead (no attention)."""

    source: torch.Tensor
    target: torch.Tensor
    attention: torch.Tensor | None


@torch.no_grad()
def layer_states(model, prompt: Prompt, layer: int) -> LayerStates:
    lm = model.model.language_model
    N = prompt.embeds.shape[0]
    i = torch.arange(N)
    mask = _additive(i[None, :] <= i[:, None], prompt.embeds.dtype)
    pe = _rope(lm, prompt.embeds, prompt.positions)
    with eager_attention(model):
        h = prompt.embeds[None]
        for li in range(layer):
            h = lm.layers[li](h, attention_mask=mask, position_embeddings=pe, position_ids=None)
        L = lm.layers[layer]
        a, w = L.self_attn(hidden_states=L.input_layernorm(h), attention_mask=mask, position_embeddings=pe)
        target = L.post_attention_layernorm(h + a)
    return LayerStates(h[0], target[0], w[0, :, -1, :].float().mean(0))


def _encoder_layer(model):
    """The vision encoder layer whose output the model uses, and its norm after attention."""
    cfg, mm = model.config, model.model
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        block = mm.visual.blocks[-1]  # the merger reads the last block's output
        return block, block.norm2
    tower = mm.vision_tower
    if cfg.model_type == "internvl":
        layers, norm = tower.encoder.layer, "layernorm_after"
    else:
        layers, norm = getattr(tower, "vision_model", tower).encoder.layers, "layer_norm2"
    # hidden_states[0] is the encoder's input, hidden_states[j] the output of layer j - 1
    layer = layers[cfg.vision_feature_layer % (len(layers) + 1) - 1]
    return layer, getattr(layer, norm)


def _token_rows(model, inputs: dict, calls: list) -> list[tuple[int, torch.Tensor]]:
    """Per encoder call: the image token id its features fill, and for each of those tokens (in
    order) the encoder rows (flattened over the call's items) it merges, -1 where the token holds
    no encoder feature (LLaVA-NeXT's newlines). Derived with the model's own merge code."""
    cfg, mm = model.config, model.model
    x = calls[0]
    mt = cfg.model_type
    if mt == "llava":
        P = x.shape[1]
        rows = torch.arange(x.shape[0] * P).view(-1, P)
        rows = rows[:, 1:] if cfg.vision_feature_select_strategy == "default" else rows
        return [(cfg.image_token_id, rows.reshape(-1, 1))]
    if mt == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        P = x.shape[1]
        index = torch.arange(x.shape[0] * P, dtype=torch.float64).view(x.shape[0], P, 1)[:, 1:]
        crops = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for size in inputs["image_sizes"].tolist()]
        packed, _ = mm.pack_image_features(list(torch.split(index, crops)), inputs["image_sizes"], "default",
                                           image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return [(cfg.image_token_id, torch.cat(packed).long())]
    if mt == "internvl":
        P = x.shape[1]
        side = math.isqrt(P - 1)
        index = (torch.arange(x.shape[0] * P).view(-1, P)[:, 1:]).double().view(-1, side, side, 1)
        shuffled = mm.pixel_shuffle(index, scale_factor=cfg.downsample_ratio)
        return [(cfg.image_token_id, shuffled.reshape(-1, shuffled.shape[-1]).long())]
    # Qwen: one call for the images, then one for the videos; the merger reads m*m consecutive rows.
    m2 = cfg.vision_config.spatial_merge_size ** 2
    out = []
    kinds = [(cfg.image_token_id, "image_grid_thw"), (cfg.video_token_id, "video_grid_thw")]
    for (token_id, key), x in zip([k for k in kinds if inputs.get(k[1]) is not None], calls):
        rows = torch.arange(x.shape[0]).view(-1, m2)
        if mt == "qwen2_5_vl":
            visual, grid = mm.visual, inputs[key]
            if hasattr(visual, "get_window_index"):
                window_index = visual.get_window_index(grid)[0]
            else:
                from transformers.vision_utils import get_vision_window_index

                vc = cfg.vision_config
                window_index = get_vision_window_index(grid, spatial_merge_size=vc.spatial_merge_size,
                                                       window_size=vc.window_size, patch_size=vc.patch_size)[0]
            rows = rows[torch.argsort(window_index)]  # the blocks hold the runs in window order
        out.append((token_id, rows))
    return out


@torch.no_grad()
def vision_states(model, inputs: dict) -> LayerStates:
    """The vision stage's source and target of one unpadded prompt (batch 1) at its input
    positions, (N, d_vision), zero at tokens without an encoder feature; ``attention`` is None.
    A language-model token that merges several patches gets their mean."""
    layer, norm = _encoder_layer(model)
    sources, targets = [], []

    def source(mod, args, kwargs):
        sources.append(args[0] if args else kwargs["hidden_states"])

    def target(mod, args, out):
        targets.append(out)

    h1 = layer.register_forward_pre_hook(source, with_kwargs=True)
    h2 = norm.register_forward_hook(target)
    try:
        model(**inputs, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    ids = inputs["input_ids"][0]
    states = []
    for calls in (sources, targets):
        out = torch.zeros(ids.numel(), calls[0].shape[-1], dtype=calls[0].dtype)
        for (token_id, rows), x in zip(_token_rows(model, inputs, calls), calls):
            flat = x.reshape(-1, x.shape[-1])
            feats = torch.stack([flat[r[r >= 0]].mean(0) if bool((r >= 0).any()) else torch.zeros(flat.shape[-1])
                                 for r in rows])
            out[ids == token_id] = feats
        states.append(out)
    return LayerStates(states[0], states[1], None)


@torch.no_grad()
def reference_logits(model, prompt: Prompt, kept: torch.Tensor, generated: torch.Tensor, *, layer: int,
                     kv: str = "after_k", positions: str = "original"):
    """Logits of the prompt's kept positions (L, V) and of each decode step (G + 1, V).

    ``kept``: bool (N,), the prompt tokens layers > ``layer`` see (-1: every layer, the vision
    stage); ``generated``: the G tokens fed after the prompt (teacher forcing). With ``positions=
    "compact"`` the layers > ``layer`` see the kept prompt tokens and the generated ones at 0, 1,
    2, ... step_logits[0] is the prompt's last position, step_logits[t] the logits after
    generated token t-1."""
    lm = model.model.language_model
    emb, pos = prompt.embeds, prompt.positions
    N, G = emb.shape[0], generated.numel()
    dtype = emb.dtype
    x = torch.cat([emb, lm.embed_tokens(generated.view(1, -1))[0]])
    # Generated tokens continue after the prompt's largest position (plain RoPE: N + t; M-RoPE:
    # max + 1 + t, the same on the three axes).
    start = int(pos.max()) + 1
    gpos = torch.arange(start, start + G)
    allpos = torch.cat([pos, gpos if pos.dim() == 1 else gpos.expand(3, -1)], dim=-1)
    S = N + G
    i = torch.arange(S)
    allowed = i[None, :] <= i[:, None]
    if kv == "all":
        allowed[N:, :N] &= kept[None, :]
    with eager_attention(model):
        h = x[None]
        pe = _rope(lm, x, allpos)
        mask = _additive(allowed, dtype)
        for li in range(layer + 1):
            h = lm.layers[li](h, attention_mask=mask, position_embeddings=pe, position_ids=None)
        late = torch.cat([kept, torch.ones(G, dtype=torch.bool)])
        h = h[:, late]
        j = torch.arange(h.shape[1])
        mask2 = _additive(j[None, :] <= j[:, None], dtype)
        late_pos = allpos[..., late]
        if positions == "compact":
            late_pos = torch.arange(late_pos.shape[-1]).expand(late_pos.shape)
        pe2 = _rope(lm, x[late], late_pos)
        for li in range(layer + 1, len(lm.layers)):
            h = lm.layers[li](h, attention_mask=mask2, position_embeddings=pe2, position_ids=None)
    logits = model.lm_head(lm.norm(h))[0]
    n_prompt = int(kept.sum())
    return logits[:n_prompt], logits[n_prompt - 1:]


# ---- the kept set, recomputed per method ----------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest, ties to the lower index, ascending."""
    order = sorted(range(scores.numel()), key=lambda t: (-float(scores[t]), t))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


def dart_kept(source: torch.Tensor, target: torch.Tensor, k: int, pivots: int) -> torch.Tensor:
    """DART as ``topv.integrations.scorers.dart`` states it, one segment, written out plainly."""
    n = source.shape[0]
    norm = source.float().abs().sum(-1)
    piv = sorted(range(n), key=lambda t: (-float(norm[t]), t))[: min(pivots, n)]
    if k <= len(piv):
        return torch.tensor(sorted(piv[:k]), dtype=torch.int64)
    f = torch.nn.functional.normalize(target.float(), dim=-1)
    dup = [max(float(f[t] @ f[p]) for p in piv) for t in range(n)]
    rest = sorted((t for t in range(n) if t not in piv), key=lambda t: (dup[t], t))
    return torch.tensor(sorted(piv + rest[: k - len(piv)]), dtype=torch.int64)


def reference_kept(scorer, states: LayerStates, token_index: torch.Tensor, positions: torch.Tensor,
                   k: int) -> torch.Tensor | None:
    """The kept positions within one segment (indices into ``token_index``, ascending) that
    ``scorer`` must choose, from the prompt's own layer states; None for methods whose choice is
    not a function of them (random)."""
    name = scorer.name
    if name == "topv":
        kept, _ = topv.prune(states.source[token_index], states.target[token_index], positions, k, **scorer.kwargs)
        return kept[0] if kept.dim() == 2 else kept
    if name == "fastv":
        return _top(states.attention[token_index], k)
    if name == "uniform":
        return uniform_indices(token_index.numel(), k)
    if name == "dart":
        return dart_kept(states.source[token_index], states.target[token_index], k, scorer.pivots)
    return None
