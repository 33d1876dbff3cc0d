"""Every family x every scorer x every placement x left and right padding, against the reference.

Placements: the layer stage with both KV modes, and the vision stage with original and compact
positions (every scorer but FastV, which reads the language model's attention). Each case prunes a
two-row batch (rows of different lengths and image counts; Qwen: an image and a video), checks the
batch's segments, budgets, kept sets and cache lengths, then the prefill logits and (left padding:
``generate``) every decode step against the by-hand reference on each unpadded prompt
(``integration_support``)."""

import pytest
from integration_support import FAMILIES, METHODS, VISION_METHODS, check_against_reference, inputs, model

PLACEMENTS = {
    "layer/after_k": dict(kv="after_k"),
    "layer/all": dict(kv="all"),
    "vision": dict(stage="vision"),
    "vision/compact": dict(stage="vision", positions="compact"),
}
CASES = [(p, m) for p in PLACEMENTS for m in (VISION_METHODS if p.startswith("vision") else METHODS)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("placement,method", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference(family, placement, method, padding_side):
    cfg, m = model(family)
    batch = inputs(family, cfg, padding_side=padding_side, seed=1)
    info, ginfo = check_against_reference(m, batch, keep_ratio=0.3, method=method, check_finite=False,
                                          **PLACEMENTS[placement])
    assert info.method == method and info.pruned and info.stage == placement.split("/")[0]
    if ginfo is not None:  # generate's prefill made the same choice as the forward's
        assert ginfo.keep_counts == info.keep_counts
        assert all(bool((a == b).all()) for a, b in zip(info.kept, ginfo.kept))
