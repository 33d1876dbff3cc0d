"""No host synchronisation inside the language model's forward (``check_finite=False``).

A prefill reads its layout once, in the pre-hooks, before the language model runs; everything
TopV does inside the language model (capture, scoring, gather, masks, positions, the cache record)
and in every decode step is fixed-shape device work; so is the vision stage's capture inside the
vision encoder. ``topv.testing.syncs`` flags each operation
that would synchronise a GPU (reads of values, data-dependent output sizes, copies to the host) on
CPU tensors too, with the code that caused it."""

import pytest
import torch
from integration_support import FAMILIES, METHODS, VISION_METHODS, inputs, model

import topv
from topv.integrations import engine
from topv.testing.syncs import SyncCounter


def _window(m, counter, modules):
    """Count only from each module's pre-hooks (TopV's run first) to its forward hook."""

    def start(*_):
        counter.active = True

    def stop(*_):
        counter.active = False

    return [h for mod in modules for h in (mod.register_forward_pre_hook(start), mod.register_forward_hook(stop))]


def _encoder(m):
    return m.model.visual if hasattr(m.model, "visual") else m.model.vision_tower


def _run(m, batch, counter, gen=True, modules=None):
    handles = _window(m, counter, modules or [m.model.language_model])
    counter.active = False
    try:
        with counter, torch.no_grad():
            m(**batch, use_cache=True)
            if gen:
                m.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return counter


PLACEMENTS = {"after_k": dict(kv="after_k"), "all": dict(kv="all"), "vision": dict(stage="vision")}


@pytest.mark.parametrize("family,method,kv", [(f, "topv", kv) for f in FAMILIES for kv in PLACEMENTS]
                         + [("llava", x, kv) for x in METHODS[1:] for kv in PLACEMENTS
                            if kv != "vision" or x in VISION_METHODS])
def test_no_sync_inside_the_language_model(family, method, kv):
    """... nor inside the vision encoder, where the vision stage captures."""
    cfg, m = model(family)
    batch = inputs(family, cfg, seed=50)
    modules = [m.model.language_model] + ([_encoder(m)] if kv == "vision" else [])
    with topv.enable(m, keep_ratio=0.3, method=method, check_finite=False, **PLACEMENTS[kv]) as s:
        c = _run(m, batch, SyncCounter(attribute="topv/integrations"), modules=modules)
        assert s.last is not None and s.last.pruned
    assert c.attributed() == [], [(x.op, x.where) for x in c.attributed()]
    # and it does not make transformers synchronise more than the unpruned model does
    base = _run(m, batch, SyncCounter(), modules=modules)
    assert c.count <= base.count, ([(x.op, x.where) for x in c.syncs], [(x.op, x.where) for x in base.syncs])


def test_check_finite_costs_one_sync_per_prefill():
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=51)
    with topv.enable(m, keep_ratio=0.3):
        c = _run(m, batch, SyncCounter(attribute="topv/integrations"), gen=False)
    assert len(c.attributed()) == 1, [(x.op, x.where) for x in c.attributed()]


def test_layout_is_read_once_per_prefill_and_cached(monkeypatch):
    """One host copy of the layout's inputs per prefill, before the language model runs; a layout
    seen before builds nothing."""
    cfg, m = model("qwen2_vl")
    batch = inputs("qwen2_vl", cfg, seed=52)
    reads, builds = [], []
    to_host, plan = engine._to_host, engine.Plan
    monkeypatch.setattr(engine, "_to_host", lambda t: reads.append(sorted(k for k, v in t.items() if v is not None))
                        or to_host(t))
    monkeypatch.setattr(engine, "Plan", lambda *a, **k: builds.append(1) or plan(*a, **k))
    with torch.no_grad(), topv.enable(m, keep_ratio=0.3):
        m(**batch)
        m(**batch)
    assert reads == [["attention_mask", "image_grid_thw", "input_ids", "video_grid_thw"]] * 2
    assert len(builds) == 1
