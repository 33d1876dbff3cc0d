"""Families are pure descriptions of where a prefill's images are: callable from a config and
host tensors alone (no model, no hooks), the same whichever input says the layout."""

import pytest
import torch
from integration_support import FAMILIES, PROMPTS, config, inputs, model

import topv
from topv.integrations.families import FAMILIES as REGISTRY
from topv.integrations.families import family_for
from topv.integrations.families.internvl import tile_positions
from topv.testing import tiny_models as tm
from topv.testing.reference import capture_prompt


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
