"""Bad arguments to ``topv.apply`` / ``enable`` fail at the call, with a message that says what
was expected and what came, and leave the model untouched; bad prefill inputs fail at the prefill."""

import math
import warnings

import pytest
import torch
from integration_support import hooks, inputs, model

import topv
from topv.integrations import transformers as hf
from topv.integrations.scorers import DART, METHODS
from topv.integrations.transformers import session_of


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "exactly one of keep_ratio and keep"),
    (dict(keep_ratio=0.5, keep=3), ValueError, "exactly one"),
    (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be a number in \(0, 1\], got 0.0"),
    (dict(keep_ratio=1.5), ValueError, "keep_ratio must be"),
    (dict(keep_ratio=True), ValueError, "keep_ratio must be"),
    (dict(keep=0), ValueError, "keep must be an integer >= 1, got 0"),
    (dict(keep=2.0), ValueError, "keep must be an integer"),
    (dict(keep_ratio=0.5, kv="some"), ValueError, "kv must be 'after_k' or 'all', got 'some'"),
    (dict(keep_ratio=0.5, layer=4), ValueError, r"layer must be an integer in \[0, 3\] for this 5-layer model"),
    (dict(keep_ratio=0.5, layer=-1), ValueError, "layer must be"),
    (dict(keep_ratio=0.5, layer=0, method="fastv"), ValueError, "FastV's K must be >= 1"),
    (dict(keep_ratio=0.5, layer=5, method="fastv"), ValueError, r"in \[1, 4\] .* method 'fastv'"),
    (dict(keep_ratio=0.5, method="fastV"), ValueError, "method must be one of .*'topv', 'fastv', 'random', "
                                                       "'uniform', 'dart'.*got 'fastV'"),
    (dict(keep_ratio=0.5, method="fastv", gamma=0.5), ValueError, "gamma configure method='topv'; method='fastv'"),
    (dict(keep_ratio=0.5, method="random", backend="triton"), ValueError, "backend configure method='topv'"),
    (dict(keep_ratio=0.5, eps=-1), ValueError, "eps must be a finite number > 0, got -1"),
    (dict(keep_ratio=0.5, alpha=math.nan), ValueError, "alpha must be"),
    (dict(keep_ratio=0.5, sigma=0), ValueError, "sigma must be"),
    (dict(keep_ratio=0.5, tau=0.0), ValueError, "tau must be a number > 0"),
    (dict(keep_ratio=0.5, n_iters=0), ValueError, "n_iters must be an integer >= 1"),
    (dict(keep_ratio=0.5, tol=-1.0), ValueError, "tol must be"),
    (dict(keep_ratio=0.5, recover_ratio=1.0), ValueError, r"recover_ratio must lie in \[0, 1\)"),
    (dict(keep_ratio=0.5, max_workspace=0), ValueError, "max_workspace must be a number of bytes >= 1"),
    (dict(keep_ratio=0.5, backend="bogus"), ValueError, "backend must be one of .* got 'bogus'"),
    (dict(keep_ratio=0.5, backend="cuda"), ValueError, "backend='cuda' is not available for tensors on cpu"),
    (dict(keep_ratio=0.5, check_finite="yes"), TypeError, "check_finite must be a bool"),
    (dict(keep_ratio=0.5, scorer="dart"), TypeError, "scorer must be a topv.integrations.scorers.Scorer, got str"),
    (dict(keep_ratio=0.5, scorer=DART(), method="fastv"), ValueError, "either scorer= .* or method="),
    (dict(keep_ratio=0.5, scorer=DART(), eps=0.5), ValueError, "either scorer="),
    (dict(keep_ratio=0.5, stage="encoder"), ValueError, r"stage must be one of \['layer', 'vision'\], got 'encoder'"),
    (dict(keep_ratio=0.5, stage="vision", positions="relative"), ValueError,
     r"positions must be one of \['original', 'compact'\], got 'relative'"),
    (dict(keep_ratio=0.5, positions="compact"), ValueError, "positions='compact' needs stage='vision'"),
    (dict(keep_ratio=0.5, stage="vision", layer=1), ValueError, r"layer chooses the decoder layer K .*\(got layer=1\)"),
    (dict(keep_ratio=0.5, stage="vision", kv="all"), ValueError, r"kv chooses which layers .*\(got kv='all'\)"),
    (dict(keep_ratio=0.5, stage="vision", method="fastv"), ValueError,
     r"method 'fastv' reads attention weights .* use one of \['topv', 'random', 'uniform', 'dart'\]"),
])
def test_bad_arguments_fail_at_apply(kwargs, error, match):
    cfg, m = model("llava")
    before = hooks(m)
    with pytest.raises(error, match=match):
        topv.apply(m, **kwargs)
    assert hooks(m) == before and session_of(m) is None


def test_scorer_arguments_are_checked_when_built():
    with pytest.raises(ValueError, match="pivots must be an integer >= 1"):
        DART(pivots=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        METHODS["random"](seed="1")


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    text = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="LLaVA-1.5.*Qwen2-VL.*got LlamaForCausalLM"):
        topv.apply(text, keep_ratio=0.5)


def test_transformers_version(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.16.2")
    with pytest.raises(RuntimeError, match=r"needs transformers >= 5.17; found 5.16.2"):
        hf._check_version()
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    monkeypatch.setattr(hf, "_warned_version", False)
    with pytest.warns(UserWarning, match="5.99.0 is newer than the versions the integration was verified on"):
        hf._check_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf._check_version()  # once per process, not on every apply


def test_installed_extra_matches_the_checked_minimum():
    """setup.py's `hf` extra asks for the version apply() requires."""
    import pathlib
    import re

    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    pin = re.search(r'"hf": \["transformers>=([0-9.]+)', setup).group(1)
    assert tuple(int(x) for x in pin.split(".")) == hf.MIN_VERSION


def test_pruning_arguments_pass_through_with_defaults_from_one_home():
    import inspect

    from topv import defaults as D

    sig = inspect.signature(topv.apply).parameters
    for name in ("alpha", "beta", "gamma", "sigma", "eps", "tau", "n_iters", "tol", "recover_ratio"):
        assert sig[name].default == D.PRUNE[name], name
    assert sig["layer"].default == D.LAYER
    cfg, m = model("llava")
    given = dict(alpha=0.5, beta=2.0, gamma=0.2, sigma=0.3, eps=0.2, tau=math.inf, n_iters=5, tol=1e-3,
                 recover_ratio=0.5, check_finite=False, max_workspace=1 << 20, backend="reference")
    with topv.enable(m, keep_ratio=0.5, **given) as s:
        assert s.scorer.kwargs == given
    with topv.enable(m, keep_ratio=0.5) as s:
        assert s.scorer.kwargs == dict(D.PRUNE, check_finite=True, max_workspace=None, backend="auto")


def test_bad_prefill_inputs_fail_with_their_reason():
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=60)
    image = (batch["input_ids"][0] == cfg.image_token_id).nonzero()[0, 0]
    masked = dict(batch, attention_mask=batch["attention_mask"].index_fill(1, image.view(1), 0))
    with torch.no_grad(), topv.enable(m, keep_ratio=0.5):
        with pytest.raises(ValueError, match="attention_mask masks out image tokens of row 0"):
            m(**masked)
        embeds = m.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(ValueError, match="inputs_embeds without input_ids"):
            m(inputs_embeds=embeds, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("layer,match", [([-1, -2], "scores one encoder layer; LLaVA-1.5's vision_feature_layer is "
                                                    r"\[-1, -2\]"),
                                         (0, "vision_feature_layer 0 selects no layer's output of its 1-layer encoder"),
                                         (-3, "vision_feature_layer -3 selects no layer's output")])
def test_vision_stage_needs_one_encoder_layer(layer, match, monkeypatch):
    cfg, m = model("llava")
    before = hooks(m)
    monkeypatch.setattr(m.config, "vision_feature_layer", layer)
    with pytest.raises(ValueError, match=match):
        topv.apply(m, keep_ratio=0.5, stage="vision")
    assert hooks(m) == before and session_of(m) is None


def test_vision_stage_prefill_errors():
    """The encoder must run under the session (it is what the stage scores), at the layer it was
    installed on."""
    cfg, m = model("llava")
    batch = inputs("llava", cfg, seed=61)
    with torch.no_grad():
        encoded = m.model.get_image_features(pixel_values=batch["pixel_values"])
        with topv.enable(m, keep_ratio=0.5, stage="vision"):
            with pytest.raises(RuntimeError, match="the encoder did not run under topv for this prefill"):
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  mm_encoder_outputs={"image": encoded})
            with pytest.raises(ValueError, match=r"config's vision_feature_layer \(-1\); this call asks for -2"):
                m(**batch, vision_feature_layer=-2)
