"""Decoding on a pruned cache: a hand-written loop equals generate, caches decode independently,
and a decode step costs a fixed handful of small ops and no host synchronisation."""

import pytest
import torch
from integration_support import inputs, model

import topv
from topv.testing import tiny_models as tm
from topv.testing.syncs import SyncCounter


def _manual(m, batch, n, with_mask):
    """Greedy decoding by hand: no position_ids after the prefill; the attention mask grown by one
    column per step, or none at all."""
    out = m(**batch, use_cache=True)
    cache = tm.cache_of(out)
    logits = [out.logits[:, -1]]
    mask = batch.get("attention_mask")
    for _ in range(n - 1):
        step = {"input_ids": logits[-1].argmax(-1)[:, None], tm.cache_kwarg(m): cache, "use_cache": True}
        if with_mask:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            step["attention_mask"] = mask
        out = m(**step)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _generate_logits(m, batch, n):
    g = m.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                   return_dict_in_generate=True)
    return torch.stack(g.logits, 1)


PLACEMENTS = {"after_k": dict(kv="after_k"), "all": dict(kv="all"), "vision": dict(stage="vision"),
              "vision/compact": dict(stage="vision", positions="compact")}


@pytest.mark.parametrize("placement,method", [(p, m) for p in ("after_k", "all") for m in ("topv", "fastv")]
                         + [("vision", "topv"), ("vision/compact", "topv")])
@pytest.mark.parametrize("family,with_mask", [("llava", False), ("llava", True), ("qwen2_vl", False)])
def test_manual_loop_equals_generate(family, with_mask, placement, method):
    """When every layer's cache is pruned (kv="all", the vision stage) the model would read
    positions off the shorter cache (plain RoPE, and M-RoPE with rope_deltas); TopV hands it the
    unpruned ones, or under compact positions those after the pruned prefix, whatever generate
    computed. (Qwen's own forward cannot decode with a mask but without positions, pruned or
    not: generate passes them.)"""
    cfg, m = model(family)
    one = tm.split_batch(cfg, inputs(family, cfg, seed=31))[0]
    with torch.no_grad(), topv.enable(m, keep_ratio=0.3, method=method, **PLACEMENTS[placement]):
        want = _generate_logits(m, one, 5)
        got = _manual(m, one if with_mask else {k: v for k, v in one.items() if k != "attention_mask"}, 5, with_mask)

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_two_caches_decoded_alternately():
    """Per-request state follows the cache object: two pruned requests, decoded in turns, each
    match their own generate."""
    cfg, m = model("llava")
    prompts = [tm.llava_inputs(cfg, [[5, "img", 7]], seed=32), tm.llava_inputs(cfg, [[2, "img", "img", 9]], seed=33)]
    n = 4
    with torch.no_grad(), topv.enable(m, keep_ratio=0.3, kv="all"):
        want = [_generate_logits(m, p, n) for p in prompts]
        caches, logits = [], []
        for p in prompts:
            out = m(**{k: v for k, v in p.items() if k != "attention_mask"}, use_cache=True)
            caches.append(tm.cache_of(out))
            logits.append([out.logits[:, -1]])
        for _ in range(n - 1):
            for i in (0, 1):
                out = m(input_ids=logits[i][-1].argmax(-1)[:, None], **{tm.cache_kwarg(m): caches[i]}, use_cache=True)
                logits[i].append(out.logits[:, -1])
    for i in (0, 1):
        torch.testing.assert_close(torch.stack(logits[i], 1), want[i], atol=1e-5, rtol=1e-5)


_VIEWS = {"slice", "unsqueeze", "expand", "view", "alias", "select", "t", "transpose"}


def _decode_step_log(m, batch):
    """The ops and syncs TopV's own code causes in one decode step with generate's inputs (the
    attention mask grown by one column)."""
    out = m(**batch, use_cache=True)
    mask = batch["attention_mask"]
    step = {"input_ids": out.logits[:, -1].argmax(-1)[:, None], tm.cache_kwarg(m): tm.cache_of(out),
            "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1), "use_cache": True}
    with SyncCounter(attribute="topv/integrations", count_ops=True) as log:
        m(**step)
    return log


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kv", ["after_k", "all", "vision/compact"])
def test_decode_step_adds_a_fixed_handful_of_ops(kv, padding, attn):
    """What a decode step on a pruned cache adds does not grow with the number of layers, and
    reads nothing off the device: with no padding under SDPA nothing at all (the model's own mask
    tells that none is needed); otherwise one mask over the pruned keys, built once per step."""
    counts = []
    for layers in (4, 8):
        cfg = tm.llava_config(text_layers=layers, attn=attn)
        m = tm.build(cfg, seed=40)
        prompts = [[5, "img", 7]] + ([[3, "img", 2]] if padding else [])
        batch = tm.llava_inputs(cfg, prompts, seed=40)
        with torch.no_grad(), topv.enable(m, keep_ratio=0.3, check_finite=False, **PLACEMENTS[kv]):
            log = _decode_step_log(m, batch)
        assert log.attributed() == [], log.attributed()
        counts.append(len([op for op in log.ops if op.split(".")[1] not in _VIEWS]))
    assert counts[0] == counts[1], counts
    if kv == "after_k" and attn == "sdpa" and not padding:
        assert counts[0] == 0
    assert counts[0] <= 11, counts
