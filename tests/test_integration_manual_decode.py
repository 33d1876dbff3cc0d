"""A hand-written decode loop (no generate, no attention_mask, no position_ids) on a pruned cache
must give generate's logits: under kv="all" the model would otherwise read positions off the
shorter cache (plain RoPE and M-RoPE + rope_deltas)."""

import warnings

import pytest
import torch

import topv
from topv.integrations import tiny_models as tm


def _manual(model, inputs, n):
    out = model(**inputs, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    cache = out.cache if cache is None else cache
    logits = [out.logits[:, -1]]
    for _ in range(n - 1):
        with warnings.catch_warnings():  # `past_key_values` is the name both 5.17 and 5.24 accept
            warnings.simplefilter("ignore", FutureWarning)
            out = model(input_ids=logits[-1].argmax(-1)[:, None], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_manual_loop_equals_generate(family, kv):
    if family == "llava":
        cfg = tm.llava_config()
        inp = tm.llava_inputs(cfg, [[5, "img", 7]], seed=31)
    else:
        cfg = tm.qwen2_vl_config()
        inp = tm.qwen2_vl_inputs(cfg, [[3, ("img", (3, 4)), 5]], seed=31)
    model = tm.build(cfg, seed=31)
    no_mask = {k: v for k, v in inp.items() if k != "attention_mask"}
    with torch.no_grad(), topv.enable(model, keep_ratio=0.3, kv=kv):
        g = model.generate(**inp, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        manual = _manual(model, no_mask, 5)
    torch.testing.assert_close(manual, torch.stack(g.logits, 1), atol=1e-5, rtol=1e-5)


def test_two_caches_decoded_alternately():
    """Per-request state follows the cache object: two pruned requests, decoded in turns, each
    match their own generate."""
    cfg = tm.llava_config()
    model = tm.build(cfg, seed=32)
    prompts = [tm.llava_inputs(cfg, [[5, "img", 7]], seed=32), tm.llava_inputs(cfg, [[2, "img", "img", 9]], seed=33)]
    n = 4
    with torch.no_grad(), topv.enable(model, keep_ratio=0.3, kv="all"):
        want = [torch.stack(model.generate(**p, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True).logits, 1)
                for p in prompts]
        caches, logits = [], []
        for p in prompts:
            out = model(**{k: v for k, v in p.items() if k != "attention_mask"}, use_cache=True)
            c = getattr(out, "past_key_values", None)
            caches.append(out.cache if c is None else c)
            logits.append([out.logits[:, -1]])
        for _ in range(n - 1):
            for i in (0, 1):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    out = model(input_ids=logits[i][-1].argmax(-1)[:, None], past_key_values=caches[i], use_cache=True)
                logits[i].append(out.logits[:, -1])
    for i in (0, 1):
        torch.testing.assert_close(torch.stack(logits[i], 1), want[i], atol=1e-5, rtol=1e-5)
