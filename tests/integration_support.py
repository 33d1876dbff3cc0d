"""Shared pieces of the integration tests: one tiny model per family (built once per session),
its prompts, and the check of a hooked model against the by-hand reference (``topv.testing``)."""

from __future__ import annotations

from functools import cache

import torch

import topv
from topv.integrations.families import family_for
from topv.integrations.layout import budget
from topv.testing import tiny_models as tm
from topv.testing.reference import capture_prompt, layer_states, reference_kept, reference_logits, vision_states

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl")
METHODS = ("topv", "fastv", "random", "uniform", "dart")
VISION_METHODS = ("topv", "random", "uniform", "dart")  # every method but FastV, which reads the LM's attention

# Two rows of different lengths and image counts per family: adjacent images (LLaVA), AnyRes
# grids of different shapes (LLaVA-NeXT), an image and a video of different sizes (Qwen), tiled
# images with a thumbnail (InternVL).
PROMPTS = {
    "llava": [[5, "img", 7], [3, "img", 2, "img", 4]],
    "llava_next": [[3, ("img", (20, 50)), 4], [2, ("img", (56, 40)), ("img", (28, 28)), 3]],
    "qwen2_vl": [[3, ("img", (3, 4)), 5], [2, ("img", (2, 2)), 3, ("vid", (2, 3, 2)), 2]],
    "qwen2_5_vl": [[3, ("img", (3, 4)), 5], [2, ("img", (2, 2)), 3, ("vid", (2, 3, 2)), 2]],
    "internvl": [[3, ("img", 1), 4], [2, ("img", 3), 2, ("img", 5), 3]],
}

_CONFIGS = {
    "llava": lambda attn: tm.llava_config(text_layers=5, attn=attn),
    "llava_next": lambda attn: tm.llava_next_config(attn=attn),
    "qwen2_vl": lambda attn: tm.qwen2_vl_config(version=2, attn=attn),
    "qwen2_5_vl": lambda attn: tm.qwen2_vl_config(version=25, attn=attn),
    "internvl": lambda attn: tm.internvl_config(attn=attn),
}
_INPUTS = {
    "llava": tm.llava_inputs,
    "llava_next": tm.llava_next_inputs,
    "qwen2_vl": tm.qwen2_vl_inputs,
    "qwen2_5_vl": tm.qwen2_vl_inputs,
    "internvl": tm.internvl_inputs,
}


def config(family: str, attn: str = "sdpa"):
    return _CONFIGS[family](attn)


@cache
def model(family: str, attn: str = "sdpa"):
    """(config, model) of one family, built once per test session; tests must leave it as found."""
    cfg = config(family, attn)
    return cfg, tm.build(cfg, seed=FAMILIES.index(family) + 1)


def inputs(family: str, cfg, prompts=None, *, padding_side: str = "left", seed: int = 0):
    return _INPUTS[family](cfg, PROMPTS[family] if prompts is None else prompts, padding_side=padding_side,
                           seed=seed)


def hooks(m) -> int:
    return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())


@torch.no_grad()
def check_against_reference(m, batch: dict, *, max_new_tokens: int = 3, atol: float = 1e-4, **enable_kwargs):
    """Run ``m`` under ``topv.enable(m, **enable_kwargs)`` on ``batch`` (a prefill forward, then
    greedy ``generate`` when the batch is left-padded or unpadded, as generate requires) and hold
    every row to the reference on its unpadded prompt:

    * the row's segments equal the family's segments of the unpadded prompt (shifted by the padding);
    * every segment keeps exactly its budget, and the kept set is the one the method's reference
      recomputes from the prompt's own layer states (stage "vision": its vision encoder's states),
      where the method's choice is a function of them;
    * the prefill logits of the kept positions and every decode step's logits and greedy tokens
      equal :func:`reference_logits` given that kept set (stage "vision": every layer on the kept
      sequence, at the original or compact positions);
    * every layer's cache holds the pruned length (stage "vision"), or as ``kv`` says.

    Returns the session's ``PrefillInfo`` of the forward and of generate's prefill (or None)."""
    cfg = m.config
    with topv.enable(m, **enable_kwargs) as s:
        out = m(**batch, use_cache=True)
        info = s.last
        mask = batch["attention_mask"].bool()
        left = bool(mask[:, -1].all())
        gen = ginfo = None
        if left and max_new_tokens:
            gen = m.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
            ginfo = s.last
        scorer, settings = s.scorer, s.settings
    layer = settings.layer
    n_layers = len(m.model.language_model.layers)
    pruned_from = 0 if settings.kv == "all" else layer + 1
    assert info.cache_lengths == [info.input_length] * pruned_from + [info.pruned_length] * (n_layers - pruned_from)
    family = family_for(cfg, image_newline=getattr(m.model, "image_newline", None))
    kind = enable_kwargs.get("keep_ratio"), enable_kwargs.get("keep")
    for b, one in enumerate(tm.split_batch(cfg, batch)):
        offset = int(mask[b].long().argmax())  # the row's first real token
        mine = [(i, seg) for i, seg in enumerate(info.segments) if seg.row == b]
        own = family.segments(one["input_ids"], one)
        assert len(own) == len(mine), (b, len(own), len(mine))
        prompt = capture_prompt(m, one)
        states = vision_states(m, one) if settings.stage == "vision" else layer_states(m, prompt, layer)
        kept = torch.ones(prompt.embeds.shape[0], dtype=torch.bool)
        for (i, seg), ref in zip(mine, own):
            assert torch.equal(seg.token_index - offset, ref.token_index) and torch.equal(seg.unscored - offset,
                                                                                          ref.unscored)
            torch.testing.assert_close(seg.positions, ref.positions)
            k = budget(ref.token_index.numel(), *kind)
            got = info.kept[i] - offset
            assert info.keep_counts[i] == k and got.numel() == k
            assert bool((got[1:] > got[:-1]).all()) and set(got.tolist()) <= set(ref.token_index.tolist())
            want = reference_kept(scorer, states, ref.token_index, ref.positions, k)
            if want is not None:
                assert torch.equal(got, ref.token_index[want]), (scorer.name, b, i, got, ref.token_index[want])
            kept[ref.token_index] = False
            kept[got] = True
        new = gen.sequences[b, -max_new_tokens:-1] if gen is not None else torch.zeros(0, dtype=torch.long)
        pre, steps = reference_logits(m, prompt, kept, new, layer=layer, kv=settings.kv, positions=settings.positions)
        torch.testing.assert_close(out.logits[b][info.valid[b]], pre, atol=atol, rtol=1e-4)
        if gen is not None:
            glog = torch.stack([lg[b] for lg in gen.logits])
            torch.testing.assert_close(glog, steps, atol=atol, rtol=1e-4)
            assert torch.equal(glog.argmax(-1), steps.argmax(-1))
    return info, ginfo
