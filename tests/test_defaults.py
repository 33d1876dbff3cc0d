"""topv/defaults.py is the one home of every default: the typed API, the op schemas, the reference,
the C API header and the docs carry the same values (the header and the docs are checked here)."""

import inspect
import math
import pathlib
import re

import pytest
import torch

import topv
from topv import defaults as D
from topv import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRUNE_KEYS = set(D.PRUNE)


def _kw_defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def test_typed_api_and_reference_take_the_defaults():
    for fn in (topv.prune, reference.prune_padded):
        got = _kw_defaults(fn)
        assert {k: got[k] for k in PRUNE_KEYS} == D.PRUNE, fn.__qualname__
    for fn in (topv.cost_matrix, reference.cost_matrix):
        got = _kw_defaults(fn)
        assert (got["alpha"], got["beta"], got["gamma"], got["sigma"]) == (D.ALPHA, D.BETA, D.GAMMA, D.SIGMA)
    for fn in (topv.sinkhorn, reference.sinkhorn):
        got = _kw_defaults(fn)
        assert (got["eps"], got["n_iters"], got["tol"], got["tau_a"], got["tau_b"]) == (
            D.EPS, D.N_ITERS, D.TOL, D.TAU_A, D.TAU_B)


def test_model_integration_takes_the_defaults():
    from topv.integrations import transformers as hf

    got = _kw_defaults(hf.apply)
    assert {k: got[k] for k in PRUNE_KEYS} == D.PRUNE and got["layer"] == D.LAYER


def test_op_schemas_take_the_defaults():
    args = {a.name: a.default_value for a in torch.ops.topv.prune.default._schema.arguments}
    assert {k: args[k] for k in PRUNE_KEYS} == pytest.approx(D.PRUNE)
    args = {a.name: a.default_value for a in torch.ops.topv.sinkhorn.default._schema.arguments}
    assert (args["eps"], args["n_iters"], args["tol"]) == pytest.approx((D.EPS, D.N_ITERS, D.TOL))
    assert args["tau_a"] is None and args["tau_b"] is None and math.isinf(D.TAU_A) and math.isinf(D.TAU_B)
    args = {a.name: a.default_value for a in torch.ops.topv.cost_matrix.default._schema.arguments}
    assert (args["alpha"], args["beta"], args["gamma"], args["sigma"]) == pytest.approx((D.ALPHA, D.BETA, D.GAMMA, D.SIGMA))


def test_c_api_header_takes_the_defaults():
    h = (ROOT / "csrc/include/topv/args.h").read_text() + (ROOT / "csrc/include/topv/topv.h").read_text()

    def c_default(name):
        m = re.search(rf"\b{name}\s*=\s*([0-9.]+|INFINITY)f?\b", h)
        assert m, f"no default for {name} in topv.h"
        return math.inf if m.group(1) == "INFINITY" else float(m.group(1))

    for name in ("alpha", "beta", "gamma", "sigma", "eps", "n_iters", "tol", "tau", "recover_ratio"):
        assert c_default(name) == pytest.approx(D.PRUNE[name]), name
    assert c_default("tau_a") == D.TAU_A and c_default("tau_b") == D.TAU_B
    assert re.search(r"kDefaultCostBufferCap = size_t\((\d+)\) << (\d+);", h).groups() == ("192", "20")
    assert D.WORKSPACE_FLOOR_BYTES == 192 << 20
    assert float(re.search(r"kCostBufferFreeFraction = ([0-9.]+);", h).group(1)) == D.WORKSPACE_FREE_FRACTION


def test_docs_state_the_defaults():
    doc = (ROOT / "docs/algorithm.md").read_text()
    table = doc[doc.index("## Defaults"):]
    for name, value in {**D.PRUNE, "layer": D.LAYER}.items():
        m = re.search(rf"^\| `{name}` \| ([^|]+) \|", table, re.M)
        assert m, f"docs/algorithm.md's defaults table has no row for {name}"
        assert float(m.group(1).strip()) == pytest.approx(value), name
