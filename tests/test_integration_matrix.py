"""Every family x every scorer x both KV modes x left and right padding, against the reference.

Each case prunes a two-row batch (rows of different lengths and image counts), checks the batch's
segments, budgets and kept sets, then the prefill logits and (left padding: ``generate``) every
decode step against the by-hand reference on each unpadded prompt (``integration_support``)."""

import pytest
from integration_support import FAMILIES, METHODS, check_against_reference, inputs, model


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("kv", ["after_k", "all"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference(family, method, kv, padding_side):
    cfg, m = model(family)
    batch = inputs(family, cfg, padding_side=padding_side, seed=1)
    info, ginfo = check_against_reference(m, batch, keep_ratio=0.3, kv=kv, method=method, check_finite=False)
    assert info.method == method and info.pruned
    if ginfo is not None:  # generate's prefill made the same choice as the forward's
        assert ginfo.keep_counts == info.keep_counts
        assert all(bool((a == b).all()) for a, b in zip(info.kept, ginfo.kept))
