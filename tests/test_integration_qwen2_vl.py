"""TopV inside Qwen2-VL and Qwen2.5-VL (tiny random models, CPU): M-RoPE positions, dynamic
resolution (images of different sizes in one batch), video, both KV modes."""

import pytest
import torch

import topv
from topv.integrations import tiny_models as tm
from topv.integrations.hf_reference import check_against_reference
from topv.integrations.transformers import session_of

# Row 0: one 3x4 image; row 1: a 2x2 and a 4x3 image (merged-patch grids), different lengths.
PROMPTS = [[3, ("img", (3, 4)), 5], [2, ("img", (2, 2)), 3, ("img", (4, 3)), 2]]
VIDEO = [[2, ("vid", (2, 3, 2)), 3, ("img", (2, 3)), 2]]


@pytest.fixture(scope="module", params=[2, 25], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    cfg = tm.qwen2_vl_config(version=request.param, text_layers=4)
    return cfg, tm.build(cfg, seed=request.param)


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_keep_all_is_exact(qwen, kv):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS)
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
        with topv.enable(model, keep_ratio=1.0, kv=kv):
            out = model(**inp).logits
            gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)


@pytest.mark.parametrize("kv", ["after_k", "all"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_reference_batched(qwen, kv, padding_side):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS, padding_side=padding_side, seed=1)
    check_against_reference(model, inp, tm.split_batch(cfg, inp), keep_ratio=0.4, kv=kv, max_new_tokens=4)


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_video_and_image_match_reference(qwen, kv):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, VIDEO, seed=2)
    info, _ = check_against_reference(model, inp, tm.split_batch(cfg, inp), keep=3, kv=kv, max_new_tokens=3)
    assert [s.kind for s in info.segments] == ["video", "image"]
    assert info.keep_counts == [3, 3]


def test_layout_from_positions_equals_layout_from_grid(qwen):
    """generate (transformers >= 5.2x) encodes images before the prefill and passes no grid; the
    layout then comes from the model's own M-RoPE positions and must be the same."""
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS + [[1, ("vid", (2, 2, 3)), 2]], seed=3)
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(inp["input_ids"], image_grid_thw=inp["image_grid_thw"],
                                            video_grid_thw=inp["video_grid_thw"],
                                            attention_mask=inp["attention_mask"],
                                            mm_token_type_ids=inp["mm_token_type_ids"])
    with topv.enable(model, keep_ratio=0.5) as s:
        a = s.family.segments(inp["input_ids"], inp)
        b = s.family.segments(inp["input_ids"], {"position_ids": pos})
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x.row == y.row and torch.equal(x.token_index, y.token_index)
        torch.testing.assert_close(x.positions, y.positions)


def test_batched_equals_per_sample(qwen):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS, seed=4)
    with torch.no_grad(), topv.enable(model, keep_ratio=0.25, kv="all"):
        batched = model.generate(**inp, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
        for b, one in enumerate(tm.split_batch(cfg, inp)):
            alone = model.generate(**one, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
            assert torch.equal(alone[0], batched[b])


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_lengths_as_predicted(qwen, kv):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS, seed=5)
    T = inp["input_ids"].shape[1]
    with torch.no_grad(), topv.enable(model, keep_ratio=0.25, kv=kv) as s:
        out = model(**inp, use_cache=True)
    n = [12, 4, 12]
    k = [3, 1, 3]
    assert s.last.keep_counts == k
    dropped = [n[0] - k[0], n[1] - k[1] + n[2] - k[2]]
    L = T - min(dropped)
    assert s.last.pruned_length == L == out.logits.shape[1]
    layers = cfg.text_config.num_hidden_layers
    want = [T] * 3 + [L] * (layers - 3) if kv == "after_k" else [L] * layers
    assert s.last.cache_lengths == want


def test_hooks_removed(qwen):
    cfg, model = qwen
    inp = tm.qwen2_vl_inputs(cfg, PROMPTS, seed=6)
    with torch.no_grad():
        ref = model(**inp).logits
        with torch.inference_mode(), topv.enable(model, keep_ratio=0.5):
            model.generate(**inp, max_new_tokens=2, do_sample=False)
        assert session_of(model) is None
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
        assert torch.equal(model(**inp).logits, ref)
