"""Host-side argument checks shared by the real and the fake kernels of every ``topv`` op.

Nothing here reads tensor data, so the checks cost no device synchronisation and run the same
under ``torch.compile``. Every message says what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t, *, ndims: Sequence[int], dtypes=None, floating=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.requires_grad:
        raise ValueError(
            f"{name} requires grad, but topv ops are inference-only and define no backward; "
            "call them under torch.no_grad() or pass a detached tensor"
        )


def same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device")


def positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def cost_params(alpha: float, beta: float, gamma: float, sigma: float) -> None:
    nonnegative("alpha", alpha)
    nonnegative("beta", beta)
    nonnegative("gamma", gamma)
    positive("sigma", sigma)


def sinkhorn_params(eps: float, n_iters: int, tol: float) -> None:
    positive("eps", eps)
    if not isinstance(n_iters, int) or isinstance(n_iters, bool) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    nonnegative("tol", tol)


def relaxation(name: str, value: float) -> None:
    """A marginal's KL weight: > 0, and inf (an exact marginal) allowed."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):  # NaN fails too
        raise ValueError(f"{name} must be a number > 0 (inf for an exact marginal), got {value!r}")


def prune_params(p) -> None:
    """Every numeric argument of prune, given as a topv.ops.PruneParams."""
    cost_params(p.alpha, p.beta, p.gamma, p.sigma)
    sinkhorn_params(p.eps, p.n_iters, p.tol)
    relaxation("tau", p.tau)
    recover_ratio(p.recover_ratio)


def max_workspace(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_workspace must be a number of bytes >= 1 (or None for the default), got {value!r}")


def recover_ratio(value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"recover_ratio must lie in [0, 1), got {value!r}")


def positions(name: str, pos: torch.Tensor, rows: int, batch: int | None) -> None:
    """pos must be (rows, 2), or (batch, rows, 2) when batch is given."""
    tensor(name, pos, ndims=(2, 3) if batch is not None else (2,), floating=True)
    ok = pos.shape[-2:] == (rows, 2) and (pos.dim() == 2 or pos.shape[0] == batch)
    if not ok:
        want = f"({rows}, 2)" + (f" or ({batch}, {rows}, 2)" if batch is not None else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(pos.shape)}")


def int_list(name: str, values) -> list[int]:
    if isinstance(values, (int, bool)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of ints, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise TypeError(f"{name} must hold ints, got {v!r} ({type(v).__name__})")
        out.append(v)
    return out


def budgets(keep: list[int], seg_lens: list[int]) -> None:
    for i, (k, n) in enumerate(zip(keep, seg_lens)):
        if not 1 <= k <= n:
            where = f" for segment {i}" if len(seg_lens) > 1 else ""
            raise ValueError(f"keep must satisfy 1 <= keep <= n (the segment's token count){where}: got keep={k}, n={n}")
