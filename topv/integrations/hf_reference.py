"""A slow, obviously correct model of what :func:`topv.enable` does to one prompt.

It runs the decoder layers of the language model by hand, one unpadded prompt at a time, on
explicit sequences with explicit additive masks and explicit positions, and recomputes the
logits from scratch (no KV cache) for the prefill and for every decode step. The tests compare
the hooked model (batched, padded, with a cache, under SDPA/eager) against it.

For a prompt of N tokens followed by G generated tokens:

* layers 0..K run on all N + G tokens. A prompt token sees the prompt tokens before it. A
  generated token sees every prompt token (``kv="after_k"``) or only the kept ones
  (``kv="all"``: the pruned ones were evicted from those layers' caches), and the generated
  tokens up to itself.
* layer K is unrolled: source = its input, target = its post-attention-norm output; each
  image's kept tokens come from ``topv.prune`` on that image alone (a single segment).
* layers K+1.. run on [text tokens and kept visual tokens of the prompt, in order] + generated
  tokens with a plain causal mask; every token keeps its original (M-)RoPE position.
"""

from __future__ import annotations

import contextlib
import math

import torch

import topv


def _budget(n, keep_ratio, keep):
    if keep is not None:
        return min(keep, n)
    return min(n, max(1, math.floor(keep_ratio * n + 0.5)))


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    m = torch.zeros(allowed.shape, dtype=dtype)
    return m.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def capture_prompt(model, inputs: dict):
    """Run the unmodified model once on one unpadded prompt (batch 1) and return what enters its
    language model: inputs_embeds (N, d) and positions ((N,) or (3, N) for M-RoPE)."""
    lm = model.model.language_model
    got = {}

    def pre(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"]
        got["pos"] = kwargs.get("position_ids")

    h = lm.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        h.remove()
    emb = got["embeds"][0]
    pos = got["pos"]
    N = emb.shape[0]
    if pos is None:
        pos = torch.arange(N)
    elif pos.dim() == 3:  # M-RoPE: (3, 1, N), or (4, 1, N) with the text positions first
        pos = pos[-3:, 0]
    else:
        pos = pos[0]
    return emb, pos


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


@torch.no_grad()
def reference_logits(model, family_segments, inputs: dict, generated: torch.Tensor, *, keep_ratio=None, keep=None,
                     layer=2, kv="after_k", **prune_kwargs):
    """Logits of the prompt's kept positions (L, V) and of each decode step (G + 1, V).

    ``family_segments``: the prompt's segments (``Segment`` list for row 0, as the family adapter
    computes them; the reference trusts only their token indices and grid positions).
    ``generated``: the G tokens fed after the prompt (teacher forcing).
    Returns (prefill_logits, step_logits, kept_prompt_indices): step_logits[0] is the prompt's
    last position, step_logits[t] the logits after generated token t-1.
    """
    lm = model.model.language_model
    emb, pos = capture_prompt(model, inputs)
    with eager_attention(model):
        return _reference_logits(model, lm, emb, pos, family_segments, generated, keep_ratio=keep_ratio, keep=keep,
                                 layer=layer, kv=kv, **prune_kwargs)


def _reference_logits(model, lm, emb, pos, family_segments, generated, *, keep_ratio, keep, layer, kv,
                      **prune_kwargs):
    N, G = emb.shape[0], generated.numel()
    dtype = emb.dtype
    gen_emb = lm.embed_tokens(generated.view(1, -1))[0]
    x = torch.cat([emb, gen_emb])
    # Positions: generated tokens continue after the prompt's largest position (for plain RoPE
    # that is N + t; for M-RoPE max + 1 + t, identical on the three axes).
    start = int(pos.max()) + 1
    gpos = torch.arange(start, start + G)
    allpos = torch.cat([pos, gpos if pos.dim() == 1 else gpos.expand(3, -1)], dim=-1)

    def rope(p):
        pid = p.view(1, -1) if p.dim() == 1 else p.view(3, 1, -1)
        return lm.rotary_emb(x[None], pid)

    # ---- layers 0..K-1 on everything, layer K unrolled ------------------------------------
    S = N + G
    i = torch.arange(S)
    causal = i[None, :] <= i[:, None]
    h = x[None]
    pe = rope(allpos)

    def early_mask(kept_prompt):
        allowed = causal.clone()
        if kv == "all" and kept_prompt is not None:
            allowed[N:, :N] &= kept_prompt[None, :]
        return _additive(allowed, dtype)

    # Under kv="all" the generated tokens' early-layer attention depends on the kept set, which
    # is only known at layer K; the prompt's rows never depend on generated tokens, so layer K's
    # source/target at prompt positions come out of a first pass with the plain causal mask.
    def run_early(mask):
        hh = h
        for li in range(layer):
            hh = lm.layers[li](hh, attention_mask=mask, position_embeddings=pe, position_ids=None)
        L = lm.layers[layer]
        src = hh
        a, _ = L.self_attn(hidden_states=L.input_layernorm(hh), attention_mask=mask, position_embeddings=pe)
        r = hh + a
        tgt = L.post_attention_layernorm(r)
        return src, tgt, r + L.mlp(tgt)

    src, tgt, _ = run_early(early_mask(None))
    kept_prompt = torch.ones(N, dtype=torch.bool)
    for seg in family_segments:
        idx = seg.token_index.cpu()
        k = _budget(idx.numel(), keep_ratio, keep)
        sel, _ = topv.prune(src[0, idx], tgt[0, idx], seg.positions.cpu(), k, **prune_kwargs)
        kept_prompt[idx] = False
        kept_prompt[idx[sel]] = True
    _, _, outK = run_early(early_mask(kept_prompt))

    # ---- layers K+1.. on the kept prompt + generated tokens --------------------------------
    late = torch.cat([kept_prompt, torch.ones(G, dtype=torch.bool)])
    hl = outK[:, late]
    pl = allpos[..., late]
    S2 = hl.shape[1]
    j = torch.arange(S2)
    mask2 = _additive(j[None, :] <= j[:, None], dtype)
    pe2 = rope(pl)
    for li in range(layer + 1, len(lm.layers)):
        hl = lm.layers[li](hl, attention_mask=mask2, position_embeddings=pe2, position_ids=None)
    logits = model.lm_head(lm.norm(hl))[0]
    n_prompt = int(kept_prompt.sum())
    prefill = logits[:n_prompt]
    steps = logits[n_prompt - 1:]
    return prefill, steps, kept_prompt.nonzero().flatten()


@torch.no_grad()
def check_against_reference(model, inputs, per_sample, *, max_new_tokens=3, atol=1e-4, **topv_kwargs):
    """Run ``model`` under ``topv.enable(model, **topv_kwargs)`` on the batch ``inputs`` (prefill
    forward, then greedy ``generate``) and compare every row with :func:`reference_logits` on its
    unpadded prompt ``per_sample[b]``. Returns the session's last :class:`PrefillInfo`s
    (forward, generate) for further checks. Decode is checked only for left-padded batches (or
    unpadded ones), which is what ``generate`` supports."""
    ref_kw = {k: v for k, v in topv_kwargs.items()}
    with topv.enable(model, **topv_kwargs) as s:
        out = model(**inputs, use_cache=True)
        info = s.last
        mask = inputs["attention_mask"].bool()
        left = bool((~mask[:, -1]).logical_not().all())
        gen = None
        if left and max_new_tokens:
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            ginfo = s.last
    for b, one in enumerate(per_sample):
        emb, _ = capture_prompt(model, one)
        segs = s.family.segments(one["input_ids"], one, emb[None])
        new = gen.sequences[b, -max_new_tokens:-1] if gen is not None else torch.zeros(0, dtype=torch.long)
        pre, steps, kept = reference_logits(model, segs, one, new, **ref_kw)
        got = out.logits[b][info.valid[b]]
        assert got.shape == pre.shape, (got.shape, pre.shape)
        torch.testing.assert_close(got, pre, atol=atol, rtol=1e-4)
        if gen is not None:
            glog = torch.stack([lg[b] for lg in gen.logits])
            torch.testing.assert_close(glog, steps, atol=atol, rtol=1e-4)
            assert torch.equal(glog.argmax(-1), steps.argmax(-1))
    return info, (ginfo if gen is not None else None)
