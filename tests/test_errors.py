"""Every bad input gets a ValueError/TypeError that says what was expected and what came,
through the typed API and through torch.ops.topv alike."""

import pytest
import torch

import topv

S = torch.randn(2, 6, 8)
POS = topv.grid_positions(2, 3)
PS = torch.randn(10, 8)  # packed
PPOS = torch.rand(10, 2)


def prune_ops(*args, **kw):
    keep = args[3]
    return torch.ops.topv.prune(*args[:3], [keep] if isinstance(keep, int) else keep, **kw)


@pytest.fixture(params=["api", "ops"])
def prune(request):
    return topv.prune if request.param == "api" else prune_ops


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((S, S[:, :5], POS, 2), {}, ValueError, r"target must have the same shape as source, got \(2, 5, 8\)"),
        ((S, S.half(), POS, 2), {}, TypeError, "share a dtype"),
        ((S.int(), S.int(), POS, 2), {}, TypeError, r"source must have dtype in .* got torch.int32"),
        ((S.double(), S.double(), POS, 2), {}, TypeError, "got torch.float64"),
        ((S[0, 0], S[0, 0], POS, 2), {}, ValueError, r"source must be 2-D or 3-D, got shape \(8,\)"),
        ((S, S, POS[:5], 2), {}, ValueError, r"positions must have shape \(6, 2\) or \(2, 6, 2\), got \(5, 2\)"),
        ((S, S, POS.long(), 2), {}, TypeError, "positions must be a floating-point tensor"),
        ((S, S, POS, 0), {}, ValueError, r"1 <= keep <= n .* got keep=0, n=6"),
        ((S, S, POS, 7), {}, ValueError, r"got keep=7, n=6"),
        ((S, S, POS, 2), {"recover_ratio": 1.0}, ValueError, r"recover_ratio must lie in \[0, 1\), got 1.0"),
        ((S, S, POS, 2), {"recover_ratio": -0.1}, ValueError, "recover_ratio must lie in"),
        ((S, S, POS, 2), {"eps": 0.0}, ValueError, "eps must be a finite number > 0, got 0.0"),
        ((S, S, POS, 2), {"sigma": -1.0}, ValueError, "sigma must be a finite number > 0"),
        ((S, S, POS, 2), {"n_iters": 0}, ValueError, "n_iters must be an integer >= 1, got 0"),
        ((S, S, POS, 2), {"tol": -1e-3}, ValueError, "tol must be a finite number >= 0"),
        ((S, S, POS, 2), {"max_workspace": 0}, ValueError, r"max_workspace must be a number of bytes >= 1 \(or None"),
        ((S, S, POS, 2), {"tau": 0.0}, ValueError, r"tau must be a number > 0 \(inf for an exact marginal\), got 0.0"),
        ((S, S, POS, 2), {"tau": -1.0}, ValueError, "tau must be a number > 0"),
        ((S, S, POS, 2), {"tau": float("nan")}, ValueError, "tau must be a number > 0 .* got nan"),
        ((S, S, POS, 2), {"alpha": float("nan")}, ValueError, "alpha must be a finite number >= 0"),
        ((S, S, POS, 2), {"seg_lens": [6, 6]}, ValueError, "seg_lens is for the packed layout"),
        ((S, S, POS, 2), {"backend": "fast"}, ValueError, r"backend must be one of \['auto', 'reference'"),
        ((S, S, POS, 2), {"backend": "cuda"}, ValueError, r"backend='cuda' is not available for tensors on cpu"),
        ((PS, PS, PPOS, [2, 2]), {"seg_lens": [4, 5]}, ValueError, r"seg_lens must sum to the packed token count T=10, got sum=9"),
        ((PS, PS, PPOS, [2, 2]), {"seg_lens": [10, 0]}, ValueError, r"every segment needs at least one token, got seg_lens=\[10, 0\]"),
        ((PS, PS, PPOS, [2]), {"seg_lens": [4, 6]}, ValueError, "one budget per segment: 2 segments, got 1 budgets"),
        ((PS, PS, PPOS, [2, 5]), {"seg_lens": [6, 4]}, ValueError, "for segment 1: got keep=5, n=4"),
        ((PS, PS, PPOS[:9], [2]), {"seg_lens": [10]}, ValueError, r"positions must have shape \(10, 2\), got \(9, 2\)"),
        ((PS, PS, PPOS.to("meta"), [2]), {}, ValueError, "positions is on meta but source is on cpu"),
    ],
)
def test_prune_bad_input(prune, args, kw, exc, match):
    with pytest.raises(exc, match=match):
        prune(*args, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [({"seg_lens": [4.0, 6]}, "seg_lens must hold ints"), ({"n_iters": 2.5}, "n_iters must be an int, got 2.5"),
     ({"seg_lens": 10}, "seg_lens must be a list of ints, got int")],
)
def test_prune_api_type_errors(kw, match):
    # Through torch.ops the dispatcher's own schema check answers these (a RuntimeError naming the
    # argument); the typed API says it first as a TypeError.
    with pytest.raises(TypeError, match=match):
        topv.prune(PS, PS, PPOS, 2, **kw)


def test_prune_keep_as_list_of_bools_is_a_type_error():
    with pytest.raises(TypeError, match="keep must hold ints"):
        topv.prune(PS, PS, PPOS, [True], seg_lens=[10])


def test_prune_rejects_inputs_that_require_grad(prune):
    with pytest.raises(ValueError, match="source requires grad, but topv ops are inference-only"):
        prune(S.clone().requires_grad_(), S, POS, 2)


def test_prune_nonfinite_message():
    bad = S.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) .* check_finite=False"):
        topv.prune(bad, S, POS, 2)


def test_prune_unavailable_triton_says_why(monkeypatch):
    from topv import backends

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends._resolve.cache_clear()
    with pytest.raises(ValueError, match="Triton runs CUDA tensors"):
        topv.prune(S, S, POS, 2, backend="triton")
    backends._resolve.cache_clear()


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((S, S[:, :, :4], POS), {}, ValueError, "same feature size d, got 8 and 4"),
        ((S, S[:1], POS), {}, ValueError, "same batch size, got 2 and 1"),
        ((S, S[:, :4], POS), {}, ValueError, "tgt_pos is required when target has a different token count"),
        ((S, S, POS, POS[:2]), {}, ValueError, r"tgt_pos must have shape \(6, 2\)"),
        ((S, S, POS), {"sigma": 0.0}, ValueError, "sigma must be a finite number > 0"),
        ((S, S, POS), {"gamma": -1.0}, ValueError, "gamma must be a finite number >= 0"),
        ((S, S.bfloat16(), POS), {}, TypeError, "share a dtype"),
    ],
)
def test_cost_matrix_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        topv.cost_matrix(*args, **kw)


C = torch.rand(2, 4, 5)


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((C.double(),), {}, TypeError, r"cost must have dtype in \['torch.float32'\], got torch.float64"),
        ((C[0, 0],), {}, ValueError, "cost must be 2-D or 3-D"),
        ((C, torch.ones(5) / 5), {}, ValueError, r"a must have shape \(4,\) or \(2, 4\) to match cost \(2, 4, 5\), got \(5,\)"),
        ((C, None, torch.ones(3, 5) / 5), {}, ValueError, r"b must have shape \(5,\) or \(2, 5\)"),
        ((C, torch.tensor([0.5, 0.5, 0.0, 0.0])), {}, ValueError, "marginal a must be finite and > 0"),
        ((C,), {"eps": -0.1}, ValueError, "eps must be a finite number > 0"),
        ((C,), {"n_iters": 1.5}, TypeError, "n_iters must be an int, got 1.5"),
        ((C,), {"tol": float("inf")}, ValueError, "tol must be a finite number >= 0"),
        ((C,), {"tau_a": 0.0}, ValueError, r"tau_a must be a number > 0 \(inf for an exact marginal\), got 0.0"),
        ((C,), {"tau_b": -2.0}, ValueError, "tau_b must be a number > 0"),
        ((C,), {"tau_b": float("nan")}, ValueError, "tau_b must be a number > 0 .* got nan"),
    ],
)
def test_sinkhorn_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        topv.sinkhorn(*args, **kw)
    if "n_iters" not in kw:  # the dispatcher answers a float n_iters itself
        with pytest.raises(exc, match=match):
            torch.ops.topv.sinkhorn(*args, **kw)
