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
  tokens with a plain causal mask; every token keeps its original (M-)RoPE position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import topv
from topv.integrations.scorers.uniform import uniform_indices


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
    that layer, averaged over heads (N,)."""

    source: torch.Tensor
    target: torch.Tensor
    attention: torch.Tensor


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


@torch.no_grad()
def reference_logits(model, prompt: Prompt, kept: torch.Tensor, generated: torch.Tensor, *, layer: int,
                     kv: str = "after_k"):
    """Logits of the prompt's kept positions (L, V) and of each decode step (G + 1, V).

    ``kept``: bool (N,), the prompt tokens layers > ``layer`` see; ``generated``: the G tokens fed
    after the prompt (teacher forcing). step_logits[0] is the prompt's last position,
    step_logits[t] the logits after generated token t-1."""
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
        pe2 = _rope(lm, x[late], allpos[..., late])
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
