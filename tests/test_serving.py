"""The serving-engine contract (``topv.serving``): the budget rule engines size placeholders by, and
the selection of one request's visual tokens with their original positions, without Hugging Face."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import topv
from topv import serving
from topv.integrations.layout import budget


@pytest.mark.parametrize("n,ratio,want", [
    (576, 0.5, 288), (576, 0.25, 144), (576, 0.125, 72), (2880, 0.125, 360), (9216, 0.125, 1152),
    (5, 0.3, 2),  # 1.5 rounds half up
    (3, 0.5, 2), (7, 0.07, 1), (1, 0.01, 1),  # at least one token
    (10, 1.0, 10), (10, 1, 10),
    (np.int64(576), np.float32(0.25), 144), (torch.tensor(576), 0.25, 144),  # an engine's own integer types
])
def test_kept_count(n, ratio, want):
    assert topv.kept_count(n, ratio) == want


@pytest.mark.parametrize("args,match", [
    ((0, 0.5), "n must be an integer >= 1 .* got 0"),
    ((True, 0.5), "n must be an integer >= 1"),
    ((5.0, 0.5), "n must be an integer >= 1"),
    ((5, 0.0), r"keep_ratio must be a number in \(0, 1\], got 0.0"),
    ((5, 1.5), "keep_ratio must be a number"),
    ((5, True), "keep_ratio must be a number"),
    ((5, "0.5"), "keep_ratio must be a number"),
])
def test_kept_count_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        topv.kept_count(*args)


def test_kept_count_is_the_layer_stages_budget():
    """One rule: the integration's per-segment budget under keep_ratio is kept_count (and keep=
    caps at n)."""
    for n in (1, 2, 3, 7, 49, 119, 576, 2304, 2928):
        for r in (0.01, 0.1, 0.125, 0.25, 0.3, 0.333, 0.5, 0.77, 1.0):
            assert budget(n, r, None) == topv.kept_count(n, r), (n, r)
        assert budget(n, None, 5) == min(5, n)


@pytest.mark.parametrize("stage", ["layer", "vision"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_kept_count_is_what_the_integration_keeps(family, stage):
    from integration_support import inputs, model

    cfg, m = model(family)
    batch = inputs(family, cfg, seed=80)
    for ratio in (0.125, 0.3):
        with torch.no_grad(), topv.enable(m, keep_ratio=ratio, stage=stage) as s:
            m(**batch)
        lengths = [seg.token_index.numel() for seg in s.last.segments]
        assert s.last.keep_counts == [topv.kept_count(n, ratio) for n in lengths]
        assert [k.numel() for k in s.last.kept] == s.last.keep_counts


def _features(T, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)


def test_select_tokens_is_prune_with_the_budget_rule_and_hand_computed_positions():
    grids = [(1, 4, 6), (3, 2, 2), (5, 5)]  # an image, a 3-frame video, an image given as (h, w)
    starts, intervals = [10, 40, 70], [1.0, 2.5, 1]
    lengths = [24, 12, 25]
    source, target = _features(sum(lengths))
    sel = topv.select_tokens(source, target, grids, 0.3, starts=starts, time_intervals=intervals, n_iters=4)
    counts = [topv.kept_count(n, 0.3) for n in lengths]
    plane = torch.cat([topv.grid_positions(4, 6), topv.grid_positions(2, 2).repeat(3, 1), topv.grid_positions(5, 5)])
    kept, scores = topv.prune(source, target, plane, counts, seg_lens=lengths, n_iters=4)
    assert sel.counts == counts and torch.equal(sel.kept, kept) and torch.equal(sel.scores, scores)
    positions, rows = [], []
    offsets = [0, 24, 36]
    for p in kept.tolist():
        i = max(j for j in range(3) if offsets[j] <= p)
        t, h, w = (1, 5, 5) if i == 2 else grids[i]
        local = p - offsets[i]
        frame, r, c = local // (h * w), local % (h * w) // w, local % w
        positions.append(starts[i] + local)
        rows.append([starts[i] + int(frame * intervals[i]), starts[i] + r, starts[i] + c])
    assert sel.positions.tolist() == positions
    assert sel.mrope.T.tolist() == rows
    relative = topv.select_tokens(source, target, np.array([(1, 4, 6), (3, 2, 2), (1, 5, 5)]), 0.3,
                                  n_iters=4)  # starts 0: positions within each item; grids as an engine's array
    assert torch.equal(relative.kept, kept)
    assert relative.positions.tolist() == [p - starts[max(j for j in range(3) if offsets[j] <= k)]
                                           for p, k in zip(positions, kept.tolist())]


def test_select_tokens_agrees_with_the_vision_stage():
    """An engine calling the contract on the vision encoder's tokens of a Qwen2-VL request (an
    image and a video) keeps what the Hugging Face vision stage keeps, and the M-RoPE rows it
    returns are the model's own positions of those tokens."""
    from integration_support import model

    from topv.integrations.scorers import TopV
    from topv.testing import tiny_models as tm
    from topv.testing.reference import capture_prompt

    class Recording(TopV):
        def score(self, batch):
            self.batch = batch
            return super().score(batch)

    cfg, m = model("qwen2_vl")
    one = tm.qwen2_vl_inputs(cfg, [[2, ("img", (3, 4)), 3, ("vid", (2, 3, 2)), 2]], seed=81)
    scorer = Recording(check_finite=False)
    with torch.no_grad(), topv.enable(m, keep_ratio=0.3, stage="vision", scorer=scorer) as s:
        m(**one)
    info, b = s.last, scorer.batch
    prompt = capture_prompt(m, one)  # (3, N) M-RoPE positions of the unpruned prompt
    starts = [int(prompt.positions[0, seg.token_index[0]]) for seg in info.segments]
    sel = topv.select_tokens(b.source, b.target, [seg.grid for seg in info.segments], 0.3, starts=starts,
                             check_finite=False)
    assert sel.counts == info.keep_counts
    tokens = torch.cat([seg.token_index for seg in info.segments])
    assert torch.equal(tokens[sel.kept], torch.cat(info.kept))
    assert torch.equal(sel.mrope, prompt.positions[:, tokens[sel.kept]])


@pytest.mark.parametrize("call,error,match", [
    (lambda s, t: topv.select_tokens(s, t, [], 0.5), ValueError, "grids must be a non-empty sequence"),
    (lambda s, t: topv.select_tokens(s, t, [(2, 0)], 0.5), ValueError, r"grids\[0\] must be \(t, h, w\) or \(h, w\)"),
    (lambda s, t: topv.select_tokens(s, t, [(1, 2, 3, 4)], 0.5), ValueError, r"grids\[0\] must be"),
    (lambda s, t: topv.select_tokens(s, t, [(2, 2.0)], 0.5), ValueError, r"grids\[0\] must be"),
    (lambda s, t: topv.select_tokens(s, t, [(2, 4)], 0.5), ValueError,
     r"T = sum of t\*h\*w over grids = 8; got source \(12, 24\)"),
    (lambda s, t: topv.select_tokens(s, t[:6], [(3, 4)], 0.5), ValueError, r"target \(6, 24\)"),
    (lambda s, t: topv.select_tokens(s[None], t[None], [(3, 4)], 0.5), ValueError,
     r"source must be a 2-D \(T, d\) tensor, got torch.Size\(\[1, 12, 24\]\)"),
    (lambda s, t: topv.select_tokens(s, t, [(3, 4)], 0.0), ValueError, "keep_ratio must be a number in"),
    (lambda s, t: topv.select_tokens(s, t, [(3, 4)], 0.5, starts=[0, 1]), ValueError,
     r"starts must give one integer per item \(1\), got \[0, 1\]"),
    (lambda s, t: topv.select_tokens(s, t, [(3, 4)], 0.5, time_intervals=["1"]), ValueError,
     "time_intervals must give one number per item"),
    (lambda s, t: topv.select_tokens(s, t, [(3, 4)], 0.5, seg_lens=[12]), TypeError,
     r"unexpected keyword arguments \['seg_lens'\]"),
    (lambda s, t: topv.select_tokens(s, t, [(3, 4)], 0.5, eps=-1.0), ValueError, "eps must be"),
])
def test_select_tokens_rejects_bad_input(call, error, match):
    source, target = _features(12)
    with pytest.raises(error, match=match):
        call(source, target)


def test_group_mean():
    x = torch.arange(24, dtype=torch.float32).view(8, 3)
    torch.testing.assert_close(serving.group_mean(x, 4), torch.stack([x[:4].mean(0), x[4:].mean(0)]))
    assert torch.equal(serving.group_mean(x, 1), x)
    with pytest.raises(ValueError, match=r"first dimension is a multiple of group=3, got torch.Size\(\[8, 3\]\)"):
        serving.group_mean(x, 3)
    with pytest.raises(ValueError, match="group must be an integer >= 1, got 0"):
        serving.group_mean(x, 0)


def test_serving_imports_no_transformers():
    code = "import sys, topv.serving; assert 'transformers' not in sys.modules, 'transformers imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
