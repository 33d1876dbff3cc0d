"""What the integration promises besides matching the reference: not pruning is exact, lengths
are as predicted, hooks come off, every scorer fills ``session.last`` the same way, random is
reproducible, custom scorers plug in."""

import pytest
import torch
from integration_support import FAMILIES, METHODS, VISION_METHODS, check_against_reference, hooks, inputs, model

import topv
from topv.integrations.layout import budget
from topv.integrations.scorers import Scorer
from topv.integrations.transformers import session_of
from topv.testing import tiny_models as tm

PLACEMENTS = {"after_k": dict(kv="after_k"), "all": dict(kv="all"), "vision": dict(stage="vision")}


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_exact(family, placement):
    """Budgets that keep every token leave the forward untouched: logits and greedy tokens are
    bit-identical to the plain model, and session.last still describes the prefill."""
    cfg, m = model(family)
    batch = inputs(family, cfg, seed=2)
    with torch.no_grad():
        ref = m(**batch).logits
        ref_gen = m.generate(**batch, max_new_tokens=3, do_sample=False)
        with topv.enable(m, keep_ratio=1.0, method="dart", **PLACEMENTS[placement]) as s:
            out = m(**batch).logits
            gen = m.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)
    info = s.last
    assert not info.pruned and info.pruned_length == info.input_length == batch["input_ids"].shape[1]
    assert [k.numel() for k in info.kept] == info.keep_counts == [seg.token_index.numel() for seg in info.segments]


@pytest.mark.parametrize("kv,method", [(kv, m) for kv in ("after_k", "all") for m in METHODS]
                         + [("vision", m) for m in VISION_METHODS])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lengths_as_predicted(family, kv, method):
    """The pruned length L' and every layer's cache length (the vision stage: L' in every layer)."""
    cfg, m = model(family)
    batch = inputs(family, cfg, seed=3)
    T = batch["input_ids"].shape[1]
    with torch.no_grad(), topv.enable(m, keep_ratio=0.25, method=method, **PLACEMENTS[kv]) as s:
        out = m(**batch, use_cache=True)
    info = s.last
    n = [seg.token_index.numel() for seg in info.segments]
    assert info.keep_counts == [budget(x, 0.25, None) for x in n]
    dropped = [sum(x - k for seg, x, k in zip(info.segments, n, info.keep_counts) if seg.row == b) for b in (0, 1)]
    L = T - min(dropped)
    assert info.pruned_length == L == out.logits.shape[1]
    real = batch["attention_mask"].sum(1)
    assert info.valid.sum(1).tolist() == [int(real[b]) - dropped[b] for b in (0, 1)]
    layers = cfg.text_config.num_hidden_layers
    full = s.settings.layer + 1
    want = [T] * full + [L] * (layers - full) if kv == "after_k" else [L] * layers
    assert s.last.stage == ("vision" if kv == "vision" else "layer")
    assert info.cache_lengths == want == [tm.cache_of(out).get_seq_length(i) for i in range(layers)]
    for seg, kept in zip(info.segments, info.kept):  # every slot of a kept token maps back to it
        assert set(kept.tolist()) <= set(info.index[seg.row][info.valid[seg.row]].tolist())


def test_prefill_info_is_filled_alike_by_every_scorer():
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=4)
    infos = {}
    for method in METHODS:
        with torch.no_grad(), topv.enable(m, keep=5, method=method) as s:
            m(**batch)
        infos[method] = s.last
    ref = infos["topv"]
    for method, info in infos.items():
        assert info.method == method
        assert info.keep_counts == ref.keep_counts == [5, 5, 5]
        assert info.pruned_length == ref.pruned_length and torch.equal(info.valid, ref.valid)
        assert [seg.token_index.tolist() for seg in info.segments] == [seg.token_index.tolist() for seg in ref.segments]
        assert (info.scores is None) == (method == "uniform")
        if info.scores is not None:
            assert [x.numel() for x in info.scores] == [seg.token_index.numel() for seg in info.segments]
        assert info.host_seconds > 0 and info.score_seconds is not None


def test_random_is_reproducible():
    """The same call keeps the same tokens (the generator is re-seeded per prefill); another seed
    keeps others; the budget is exact."""
    from topv.integrations.scorers import Random

    cfg, m = model("qwen2_vl")
    batch = inputs("qwen2_vl", cfg, seed=5)

    def kept(**kw):
        with torch.no_grad(), topv.enable(m, keep_ratio=0.5, **kw) as s:
            m(**batch)
            first = [k.clone() for k in s.last.kept]
            m(**batch)
            assert all(torch.equal(a, b) for a, b in zip(first, s.last.kept))
        return first

    a, b = kept(method="random"), kept(method="random")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = kept(scorer=Random(seed=1))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert [x.numel() for x in a] == [x.numel() for x in c]


def test_random_is_uniform_and_draws_no_generator():
    """The random scores are a counter-based hash: uniform over [0, 1), distinct per token, and the
    global generator is left alone (no generator is what lets the scorer run under CUDA-graph capture)."""
    from topv.integrations.scorers.random import _hash32

    index = torch.arange(1 << 16)
    bits = _hash32(index ^ 12345)
    assert bits.unique().numel() == index.numel() and int(bits.max()) < 2**32 and int(bits.min()) >= 0
    counts = torch.histc((bits >> 8).float() * 2.0**-24, bins=16, min=0, max=1)
    assert (counts - 4096).abs().max() < 4 * 4096**0.5  # 16 bins of 4096 expected each: within ~4 sigma

    cfg, m = model("llava")
    batch = inputs("llava", cfg)
    state = torch.random.get_rng_state()
    with torch.no_grad(), topv.enable(m, keep_ratio=0.5, method="random"):
        m(**batch)
    assert torch.equal(state, torch.random.get_rng_state())


class KeepLast(Scorer):
    """A custom scorer: the last tokens of each image (reads nothing)."""

    name = "keep-last"

    def score(self, batch):
        scores = torch.cat([torch.arange(n, device=batch.device, dtype=torch.float32) for n in batch.lengths])
        return batch.top(scores), scores


def test_custom_scorer_plugs_in():
    cfg, m = model("llava_next")
    batch = inputs("llava_next", cfg, seed=6)
    info, _ = check_against_reference(m, batch, keep_ratio=0.2, scorer=KeepLast())
    for seg, kept, k in zip(info.segments, info.kept, info.keep_counts):
        assert torch.equal(kept, seg.token_index[-k:])
    assert info.method == "keep-last"


def test_hooks_removed_and_model_reusable():
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=7)
    before = hooks(m)
    attn_cfg = m.model.language_model.layers[1].self_attn.config
    with torch.no_grad():
        ref = m(**batch).logits
        for method in METHODS:
            with topv.enable(m, keep_ratio=0.5, method=method):
                assert hooks(m) > before
                m(**batch)
            assert hooks(m) == before and session_of(m) is None
            assert m.model.language_model.layers[1].self_attn.config is attn_cfg  # FastV's eager layer restored
        assert torch.equal(m(**batch).logits, ref)
        topv.apply(m, keep_ratio=0.5)
        with pytest.raises(RuntimeError, match="already applied"):
            topv.apply(m, keep_ratio=0.5)
        pruned = m(**batch).logits
        assert topv.remove(m) and not topv.remove(m)
        with topv.enable(m, keep_ratio=0.5):
            assert torch.equal(m(**batch).logits, pruned)
    with pytest.raises(ZeroDivisionError), topv.enable(m, keep_ratio=0.5):
        raise ZeroDivisionError
    assert hooks(m) == before


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_grad_modes(ctx):
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=8)
    with ctx(), topv.enable(m, keep_ratio=0.5, kv="all", method="dart"):
        g = m.generate(**batch, max_new_tokens=3, do_sample=False)
    assert g.shape == (2, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("placement", ["all", "vision"])
def test_batched_equals_per_sample(placement):
    cfg, m = model("qwen2_vl")
    batch = inputs("qwen2_vl", cfg, seed=9)
    with torch.no_grad(), topv.enable(m, keep_ratio=0.25, **PLACEMENTS[placement]):
        batched = m.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
        for b, one in enumerate(tm.split_batch(cfg, batch)):
            alone = m.generate(**one, max_new_tokens=4, min_new_tokens=4, do_sample=False)[:, -4:]
            assert torch.equal(alone[0], batched[b])


@pytest.mark.parametrize("method", ["topv", "fastv"])
def test_eager_attention_matches_reference(method):
    cfg, m = model("llava", "eager")
    batch = inputs("llava", cfg, seed=10)
    check_against_reference(m, batch, keep=6, kv="after_k", layer=1, method=method, recover_ratio=0.4
                            if method == "topv" else 0.25)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_eager_attention_vision_stage_matches_reference(positions):
    cfg, m = model("qwen2_vl", "eager")
    batch = inputs("qwen2_vl", cfg, seed=10)
    check_against_reference(m, batch, keep=3, stage="vision", positions=positions)


def test_vision_stage_comes_off_and_reads_each_encoder_call():
    """LLaVA-NeXT's vision stage wraps this instance's get_image_features (generate gives the
    image sizes to the encoder only) and unwraps it on removal; an encoder call that no prefill
    used (here: features computed by hand) does not leak into the next prefill."""
    cfg, m = model("llava_next")
    batch = inputs("llava_next", cfg, seed=12)
    before = hooks(m)
    with torch.no_grad():
        ref = m(**batch).logits
        with topv.enable(m, keep_ratio=0.4, stage="vision") as s:
            assert "get_image_features" in vars(m.model) and hooks(m) > before
            m(**batch)
            first = [k.clone() for k in s.last.kept]
            m.model.get_image_features(pixel_values=batch["pixel_values"][:1], image_sizes=batch["image_sizes"][:1])
            m(**batch)
            assert all(torch.equal(a, b) for a, b in zip(first, s.last.kept))
        assert "get_image_features" not in vars(m.model) and hooks(m) == before
        assert torch.equal(m(**batch).logits, ref)


def test_nan_never_passes():
    """check_finite (the default) refuses non-finite features for the methods that read them."""
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=11)
    layer = m.model.language_model.layers[0]
    h = layer.register_forward_hook(lambda mod, args, out: out.index_fill(1, torch.tensor([10]), float("nan")))
    try:
        for method in ("topv", "fastv", "dart"):
            with torch.no_grad(), topv.enable(m, keep_ratio=0.5, method=method), pytest.raises(ValueError,
                                                                                             match="non-finite"):
                m(**batch)
    finally:
        h.remove()
