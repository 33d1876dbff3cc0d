"""TopV inside LLaVA-NeXT (AnyRes tiles, base view, newline tokens) and InternVL (tiles plus
thumbnail): tiny random models on CPU against the by-hand reference."""

import pytest
import torch

import topv
from topv.integrations import tiny_models as tm
from topv.integrations.hf_reference import check_against_reference

NEXT_PROMPTS = [[3, ("img", (20, 50)), 4], [2, ("img", (56, 40)), ("img", (28, 28)), 3]]
INTERNVL_PROMPTS = [[3, ("img", 1), 4], [2, ("img", 3), 2, ("img", 5), 3]]


@pytest.fixture(scope="module")
def llava_next():
    cfg = tm.llava_next_config()
    return cfg, tm.build(cfg, seed=11)


@pytest.fixture(scope="module")
def internvl():
    cfg = tm.internvl_config()
    return cfg, tm.build(cfg, seed=12)


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_llava_next_matches_reference(llava_next, kv):
    cfg, model = llava_next
    inp = tm.llava_next_inputs(cfg, NEXT_PROMPTS, seed=1)
    info, _ = check_against_reference(model, inp, tm.split_batch(cfg, inp), keep_ratio=0.3, kv=kv)
    # Scored tokens: base view (7x7) plus the unpadded grid without its newline tokens.
    assert [s.token_index.numel() for s in info.segments] == [49 + 5 * 14, 49 + 14 * 10, 49 + 7 * 8]


def test_llava_next_newlines_always_kept(llava_next):
    cfg, model = llava_next
    inp = tm.llava_next_inputs(cfg, NEXT_PROMPTS, seed=2)
    with torch.no_grad(), topv.enable(model, keep=3) as s:
        model(**inp)
    info = s.last
    ids = inp["input_ids"]
    for b in range(ids.shape[0]):
        img = (ids[b] == cfg.image_token_id)
        scored = torch.zeros_like(img)
        for seg in info.segments:
            if seg.row == b:
                scored[seg.token_index] = True
        newline = img & ~scored
        kept_slots = info.index[b][info.valid[b]]
        assert newline.sum() > 0
        assert set(newline.nonzero().flatten().tolist()) <= set(kept_slots.tolist())
    assert info.keep_counts == [3, 3, 3]


def test_llava_next_keep_all_is_exact(llava_next):
    cfg, model = llava_next
    inp = tm.llava_next_inputs(cfg, NEXT_PROMPTS, seed=3)
    with torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=3, do_sample=False)
        with topv.enable(model, keep_ratio=1.0, kv="all"):
            assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref)


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_internvl_matches_reference(internvl, kv):
    cfg, model = internvl
    inp = tm.internvl_inputs(cfg, INTERNVL_PROMPTS, seed=4)
    info, _ = check_against_reference(model, inp, tm.split_batch(cfg, inp), keep_ratio=0.3, kv=kv)
    assert [s.token_index.numel() for s in info.segments] == [16, 48, 80]


def test_internvl_tiles_share_one_plane(internvl):
    cfg, model = internvl
    with topv.enable(model, keep_ratio=0.5) as s:
        pos = s.family._positions(5, "cpu")  # 2x2 tiles + thumbnail, 16 tokens each
    tiles, thumb = pos[:64], pos[64:]
    torch.testing.assert_close(thumb, topv.grid_positions(4, 4))
    # The four tiles tile [0,1]^2 at twice the thumbnail's resolution.
    got = sorted(map(tuple, tiles.tolist()))
    want = sorted(map(tuple, topv.grid_positions(8, 8).tolist()))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))


def test_internvl_keep_all_is_exact(internvl):
    cfg, model = internvl
    inp = tm.internvl_inputs(cfg, INTERNVL_PROMPTS, seed=5)
    with torch.no_grad():
        ref = model(**inp).logits
        with topv.enable(model, keep_ratio=1.0):
            assert torch.equal(model(**inp).logits, ref)
