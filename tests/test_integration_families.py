"""Families are pure descriptions of where a prefill's images are: callable from a config and
host tensors alone (no model, no hooks), the same whichever input says the layout; for the vision
stage, which encoder layer they read and which encoder tokens each image token is."""

import pytest
import torch
from integration_support import FAMILIES, PROMPTS, config, inputs, model

import topv
from topv.integrations.families import FAMILIES as REGISTRY
from topv.integrations.families import family_for
from topv.integrations.families.internvl import tile_positions
from topv.integrations.scorers import Scorer
from topv.testing import tiny_models as tm
from topv.testing.reference import capture_prompt, vision_states


@pytest.mark.parametrize("family", FAMILIES)
def test_segments_from_config_and_inputs_alone(family):
    """Every scored token is an image token, in reading order, once; every image token is either
    scored or listed as unscored; positions lie in the unit square."""
    cfg = config(family)
    batch = inputs(family, cfg, padding_side="right")
    fam = family_for(cfg)
    if fam.reads_embeds(batch):
        pytest.skip("this family reads the embeddings only when the processor's outputs are missing")
    segs = fam.segments(batch["input_ids"], batch)
    ids = batch["input_ids"]
    image_ids = {cfg.image_token_id, getattr(cfg, "video_token_id", None)}
    for b in range(ids.shape[0]):
        mine = [s for s in segs if s.row == b]
        seen = torch.cat([torch.cat([s.token_index, s.unscored]) for s in mine]).sort().values
        want = torch.tensor([t for t in range(ids.shape[1]) if int(ids[b, t]) in image_ids])
        assert torch.equal(seen, want)
        for s in mine:
            assert bool((s.token_index[1:] > s.token_index[:-1]).all())
            assert s.positions.shape == (s.token_index.numel(), 2)
            assert bool(((s.positions > 0) & (s.positions < 1)).all())
    assert len(segs) == sum(isinstance(p, tuple) or p == "img" for row in PROMPTS[family] for p in row)


def test_registry_covers_every_tested_family():
    assert set(REGISTRY) == set(FAMILIES)


def test_qwen_layout_from_positions_equals_layout_from_grid():
    """generate (transformers 5.24) encodes images before the prefill and passes no grid; the
    layout then comes from the model's own M-RoPE positions and must be the same."""
    cfg, m = model("qwen2_vl")
    batch = inputs("qwen2_vl", cfg, seed=3)
    with torch.no_grad():
        pos, _ = m.model.get_rope_index(batch["input_ids"], image_grid_thw=batch["image_grid_thw"],
                                        video_grid_thw=batch["video_grid_thw"],
                                        attention_mask=batch["attention_mask"],
                                        mm_token_type_ids=batch["mm_token_type_ids"])
    fam = family_for(cfg)
    a = fam.segments(batch["input_ids"], batch)
    b = fam.segments(batch["input_ids"], {"position_ids": pos})
    assert [s.kind for s in a] == ["image", "image", "video"] and len(b) == 3
    for x, y in zip(a, b):
        assert x.row == y.row and x.kind == y.kind and torch.equal(x.token_index, y.token_index)
        torch.testing.assert_close(x.positions, y.positions)
    with pytest.raises(ValueError, match="neither `image_grid_thw` nor 3-D position_ids"):
        fam.segments(batch["input_ids"], {})
    bad = dict(batch, image_grid_thw=batch["image_grid_thw"][:1])
    with pytest.raises(ValueError, match="`image_grid_thw` lists 1 images; input_ids hold more"):
        fam.segments(batch["input_ids"], bad)


def test_llava_next_layout_from_sizes_equals_layout_from_embeddings():
    """image_sizes (what a serving engine has) and the newline embeddings (what generate leaves)
    say the same layout."""
    cfg, m = model("llava_next")
    batch = inputs("llava_next", cfg, seed=4)
    fam = family_for(cfg, image_newline=m.model.image_newline)
    a = fam.segments(batch["input_ids"], batch)
    for one, x in zip(tm.split_batch(cfg, batch), [a[:1], a[1:]]):
        emb = capture_prompt(m, one).embeds[None]
        b = fam.segments(one["input_ids"], {k: v.cpu() for k, v in fam.embed_inputs(emb).items()})
        for s, t in zip(x, b):
            first = int(batch["attention_mask"][s.row].long().argmax())
            assert torch.equal(s.token_index - first, t.token_index) and torch.equal(s.unscored - first, t.unscored)
            torch.testing.assert_close(s.positions, t.positions)
    assert [s.token_index.numel() for s in a] == [49 + 5 * 14, 49 + 14 * 10, 49 + 7 * 8]  # base + grid, no newlines
    assert [s.unscored.numel() for s in a] == [5, 14, 7]  # one newline per grid row


def test_llava_next_newlines_always_kept():
    cfg, m = model("llava_next")
    batch = inputs("llava_next", cfg, seed=5)
    with torch.no_grad(), topv.enable(m, keep=3) as s:
        m(**batch)
    info = s.last
    for seg in info.segments:
        slots = set(info.index[seg.row][info.valid[seg.row]].tolist())
        assert seg.unscored.numel() > 0 and set(seg.unscored.tolist()) <= slots
    assert info.keep_counts == [3, 3, 3]


def test_internvl_tiles_share_one_plane():
    pos = tile_positions(4, 5)  # 2x2 tiles + thumbnail, 16 tokens each
    tiles, thumb = pos[:64], pos[64:]
    torch.testing.assert_close(thumb, topv.grid_positions(4, 4))
    got = sorted(map(tuple, tiles.tolist()))  # the four tiles cover [0,1]^2 at twice the thumbnail's resolution
    torch.testing.assert_close(torch.tensor(got), torch.tensor(sorted(map(tuple, topv.grid_positions(8, 8).tolist()))))


def test_llava_counts_are_checked():
    cfg = config("llava")
    ids = torch.full((1, 30), cfg.image_token_id)
    with pytest.raises(ValueError, match="row 0 holds 30 image tokens, not a multiple of the 49 tokens"):
        family_for(cfg).segments(ids, {})


# ---- the vision stage --------------------------------------------------------------------------


def _layer_output(module, run):
    got = {}
    h = module.register_forward_hook(lambda mod, args, out: got.update(x=out[0] if isinstance(out, tuple) else out))
    try:
        run()
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize("name,cfg", [
    ("llava", tm.llava_config(vision_layers=3, vision_feature_layer=-2)),  # LLaVA-1.5's second-to-last layer
    ("internvl", tm.internvl_config(vision_layers=2, vision_feature_layer=-2)),
    ("qwen2_vl", tm.qwen2_vl_config(vision_depth=2)),
])
def test_vision_capture_layer_is_the_one_the_model_uses(name, cfg):
    """The stage's source enters the encoder layer whose output the model feeds its projector
    (``hidden_states[vision_feature_layer]``; Qwen: the merger's input), and its target is that
    layer's norm after attention."""
    m = tm.build(cfg, seed=70)
    batch = inputs(name, cfg, [[2, ("img", (2, 2)) if name == "qwen2_vl" else ("img", 1) if name == "internvl"
                                else "img", 3]], seed=70)
    layer, norm = family_for(cfg).vision_layer(m)
    with torch.no_grad():
        if name == "qwen2_vl":
            assert layer is m.model.visual.blocks[-1] and norm is layer.norm2
            visual = lambda: m.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])  # noqa: E731
            want = visual().last_hidden_state
        else:
            tower = m.model.vision_tower
            layers = tower.encoder.layer if name == "internvl" else getattr(tower, "vision_model", tower).encoder.layers
            assert layer is layers[-2] and norm is (layer.layernorm_after if name == "internvl" else layer.layer_norm2)
            visual = lambda: tower(batch["pixel_values"], output_hidden_states=True)  # noqa: E731
            want = visual().hidden_states[cfg.vision_feature_layer]
        torch.testing.assert_close(_layer_output(layer, visual), want, rtol=0, atol=0)


class Recorder(Scorer):
    """Keeps each segment's first tokens and records what the engine handed it."""

    name = "recorder"
    needs = frozenset({"source", "target"})

    def __init__(self):
        super().__init__()
        self.seen = []

    def score(self, batch):
        self.seen.append((batch.source, batch.target))
        return batch.top(torch.zeros(sum(batch.lengths), device=batch.device)), None


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_stage_scores_the_encoder_tokens(family):
    """What the vision stage scores, per image token, is the encoder's state at the capture layer
    mapped to language-model tokens as the model merges them (the reference derives the mapping
    with the model's own pixel shuffle, AnyRes packing and window index): through the forward
    (the processor's outputs give the layout) and through generate (the encoder runs before the
    prefill; LLaVA-NeXT's and Qwen's layouts come from the embeddings and the positions)."""
    cfg, m = model(family)
    batch = inputs(family, cfg, seed=71)
    recorder = Recorder()
    with torch.no_grad(), topv.enable(m, keep_ratio=0.5, stage="vision", scorer=recorder) as s:
        m(**batch)
        forward = s.last
        m.generate(**batch, max_new_tokens=1, do_sample=False)
        assert [seg.token_index.tolist() for seg in s.last.segments] == [
            seg.token_index.tolist() for seg in forward.segments]
    assert len(recorder.seen) == 2
    mask = batch["attention_mask"].bool()
    refs = [vision_states(m, one) for one in tm.split_batch(cfg, batch)]
    lengths = [seg.token_index.numel() for seg in forward.segments]
    for source, target in recorder.seen:
        for seg, src, tgt in zip(forward.segments, torch.split(source, lengths), torch.split(target, lengths)):
            at = seg.token_index - int(mask[seg.row].long().argmax())
            torch.testing.assert_close(src, refs[seg.row].source[at], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tgt, refs[seg.row].target[at], atol=1e-5, rtol=1e-5)


def test_qwen25_window_order_is_the_models():
    from topv.integrations.families.qwen_vl import window_order

    vision_utils = pytest.importorskip("transformers.vision_utils")
    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers version computes the window index elsewhere")
    for grids, window in [([(1, 3, 4)], 2), ([(2, 3, 2), (1, 5, 7)], 2), ([(2, 8, 8), (1, 9, 4)], 4), ([(1, 4, 4)], 4)]:
        thw = torch.tensor([[t, 2 * h, 2 * w] for t, h, w in grids])
        want, _ = vision_utils.get_vision_window_index(thw, spatial_merge_size=2, window_size=window * 2 * 14,
                                                       patch_size=14)
        assert torch.equal(window_order(grids, window), want), grids


def test_llava_next_encoder_sizes_are_checked():
    cfg = config("llava_next")
    batch = inputs("llava_next", cfg, seed=72)
    fam = family_for(cfg)
    segs = fam.segments(batch["input_ids"], batch)
    rows, total = fam.vision_rows(segs, [{"image_sizes": batch["image_sizes"]}])
    assert rows.numel() == sum(s.token_index.numel() for s in segs) and int(rows.max()) < total
    assert len(set(rows.tolist())) == rows.numel()  # every scored token reads its own patch
    with pytest.raises(ValueError, match="the vision encoder was given 1 image sizes for 3 LLaVA-NeXT images"):
        fam.vision_rows(segs, [{"image_sizes": batch["image_sizes"][:1]}])
    with pytest.raises(ValueError, match=r"image 0 of size \[28, 28\] has a 7x8 grid \(105 scored tokens\); its "
                                         "segment has 119"):
        fam.vision_rows(segs, [{"image_sizes": torch.tensor([[28, 28]] * 3)}])
