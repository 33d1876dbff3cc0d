"""TopV inside LLaVA-1.5 (tiny random model, CPU): exactness, reference equality, lengths, hooks."""

import pytest
import torch

import topv
from topv.integrations import tiny_models as tm
from topv.integrations.hf_reference import check_against_reference
from topv.integrations.transformers import session_of

PROMPTS = [[5, "img", 7], [3, "img", 2, "img", 4]]  # two rows, one with two adjacent images


@pytest.fixture(scope="module")
def llava():
    cfg = tm.llava_config(text_layers=5)
    return cfg, tm.build(cfg, seed=0)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_keep_all_is_exact(llava, kv):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS)
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
        with topv.enable(model, keep_ratio=1.0, kv=kv):
            out = model(**inp).logits
            gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("kv", ["after_k", "all"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_matches_reference_batched(llava, kv, padding_side):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS, padding_side=padding_side, seed=1)
    per = tm.split_batch(cfg, inp)
    check_against_reference(model, inp, per, keep_ratio=0.3, kv=kv, max_new_tokens=4)


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_matches_reference_batch1_keep_count(llava, kv):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, [[4, "img", 6]], seed=2)
    check_against_reference(model, inp, tm.split_batch(cfg, inp), keep=5, kv=kv, layer=1, recover_ratio=0.4,
                            max_new_tokens=4)


def test_batched_equals_per_sample(llava):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS, seed=3)
    with torch.no_grad(), topv.enable(model, keep_ratio=0.25):
        batched = model.generate(**inp, max_new_tokens=4, do_sample=False)[:, -4:]
        for b, one in enumerate(tm.split_batch(cfg, inp)):
            alone = model.generate(**one, max_new_tokens=4, do_sample=False)[:, -4:]
            assert torch.equal(alone[0], batched[b])


@pytest.mark.parametrize("kv", ["after_k", "all"])
def test_lengths_as_predicted(llava, kv):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS, seed=4)
    T = inp["input_ids"].shape[1]
    n_img = 49
    with torch.no_grad(), topv.enable(model, keep_ratio=0.25, kv=kv) as s:
        out = model(**inp, use_cache=True)
    k = round(0.25 * n_img)
    # Row 1 drops two images' worth of tokens; row 0 one; rows are aligned to the longer one.
    L = T - (n_img - k)
    info = s.last
    assert info.pruned_length == L and out.logits.shape[1] == L
    assert info.keep_counts == [k, k, k]
    assert all(kk.numel() == k for kk in info.kept)
    assert info.valid.sum(1).tolist() == [int(inp["attention_mask"][b].sum()) - (n_img - k) * nb
                                          for b, nb in enumerate([1, 2])]
    K, n = 2, cfg.text_config.num_hidden_layers
    want = [T] * (K + 1) + [L] * (n - K - 1) if kv == "after_k" else [L] * n
    assert info.cache_lengths == want
    assert [out.past_key_values.get_seq_length(i) if hasattr(out, "past_key_values") and out.past_key_values is not None
            else out.cache.get_seq_length(i) for i in range(n)] == want


def test_hooks_removed_and_model_reusable(llava):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS, seed=5)
    before = _hooks(model)
    with torch.no_grad():
        ref = model(**inp).logits
        with topv.enable(model, keep_ratio=0.5):
            assert _hooks(model) > before
            pruned = model(**inp).logits
        assert _hooks(model) == before and session_of(model) is None
        assert torch.equal(model(**inp).logits, ref)
        topv.apply(model, keep_ratio=0.5)
        with pytest.raises(RuntimeError, match="already applied"):
            topv.apply(model, keep_ratio=0.5)
        again = model(**inp).logits
        assert topv.remove(model) and not topv.remove(model)
    assert torch.equal(again, pruned)
    with pytest.raises(ZeroDivisionError), topv.enable(model, keep_ratio=0.5):
        raise ZeroDivisionError
    assert _hooks(model) == before


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_grad_modes(llava, ctx):
    cfg, model = llava
    inp = tm.llava_inputs(cfg, PROMPTS, seed=6)
    with ctx(), topv.enable(model, keep_ratio=0.5, kv="all"):
        g = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert g.shape == (2, inp["input_ids"].shape[1] + 3)


def test_eager_attention_matches_reference():
    cfg = tm.llava_config(text_layers=4, attn="eager")
    model = tm.build(cfg, seed=7)
    inp = tm.llava_inputs(cfg, PROMPTS, seed=7)
    check_against_reference(model, inp, tm.split_batch(cfg, inp), keep_ratio=0.2, kv="after_k", max_new_tokens=3)


def test_errors(llava):
    cfg, model = llava
    from transformers import LlamaConfig, LlamaForCausalLM

    text = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="LLaVA-1.5.*Qwen2-VL"):
        topv.apply(text, keep_ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        topv.apply(model)
    with pytest.raises(ValueError, match="layer must be"):
        topv.apply(model, keep_ratio=0.5, layer=4)
    with pytest.raises(ValueError, match="kv must be"):
        topv.apply(model, keep_ratio=0.5, kv="some")
    assert session_of(model) is None


def test_fastv_baseline_ranks_by_last_token_attention(llava):
    """The benchmark's FastV baseline: layer K-1's last-token attention (head mean) picks the kept
    tokens; layers >= K see them; the eager override of that one layer is undone."""
    from topv.integrations.fastv import apply_fastv

    cfg, model = llava
    inp = tm.llava_inputs(cfg, [[5, "img", 7]], seed=8)
    lm = model.model.language_model
    got = {}

    def keep_weights(module, args, output):
        got.setdefault("w", output[1])

    h = lm.layers[1].self_attn.register_forward_hook(keep_weights)
    try:
        s = apply_fastv(model, keep=10, layer=2)
        with torch.no_grad():
            model(**inp, use_cache=True)
    finally:
        h.remove()
        topv.remove(model)
    w = got["w"][0, :, -1, :].float().mean(0)  # eager weights of layer 1, last query
    idx = s.last.segments[0].token_index
    want = idx[w[idx].topk(10).indices].sort().values
    assert torch.equal(s.last.kept[0], want)
    T = inp["input_ids"].shape[1]
    assert s.last.cache_lengths == [T, T] + [T - 39] * 3
    assert lm.layers[1].self_attn.config._attn_implementation == "sdpa"
