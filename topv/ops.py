"""The ``topv`` operator library: schemas, fake kernels, validation, and the route to a backend.

Python owns every ``topv::`` schema, so ``torch.ops.topv.*`` and its fake kernel exist on any
machine, with or without the C++ extension or Triton. Two families:

* public ops ``topv::cost_matrix``, ``topv::sinkhorn``, ``topv::prune``: validate their
  arguments (host-side only), resolve ``backend`` (:mod:`topv.backends`) and call its launcher.
  One Python kernel serves every device (CompositeExplicitAutograd); fake kernels serve
  Meta/FakeTensor.
* native ops ``topv::cost_matrix_native``, ``topv::sinkhorn_native``, ``topv::prune_native``:
  raw entry points into the C++ extension (``topv._C``), which registers their CPU and CUDA
  kernels with ``TORCH_LIBRARY_IMPL``. They take already-normalised inputs and are what a C++
  stack calls through the dispatcher; the ``cuda`` and ``cpp`` launchers call them.

The typed API (:mod:`topv.api`) calls the public ops' kernels (``*_eager``) directly when nothing
traces the call (no torch.compile, no dispatch mode, plain tensors): the same code, without the
dispatcher's round trip into Python. Asking for an unavailable backend raises; nothing falls
back silently.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from topv import _validate as V
from topv import backends
from topv import defaults as D
from topv.backends import available_backends, resolve_backend  # noqa: F401  (the public names)

_lib = torch.library.Library("topv", "DEF")  # kept alive at module level: it owns the schemas

_COST_ARGS = f"float alpha={D.ALPHA!r}, float beta={D.BETA!r}, float gamma={D.GAMMA!r}, float sigma={D.SIGMA!r}"
_lib.define(
    "cost_matrix(Tensor source, Tensor target, Tensor src_pos, Tensor? tgt_pos=None, *, "
    f"{_COST_ARGS}, str backend='auto') -> Tensor"
)
# A schema cannot spell inf: None stands for it (an exact marginal), and inf itself is accepted.
_lib.define(
    f"sinkhorn(Tensor cost, Tensor? a=None, Tensor? b=None, *, float eps={D.EPS!r}, int n_iters={D.N_ITERS}, "
    f"float tol={D.TOL!r}, float? tau_a=None, float? tau_b=None, str backend='auto') -> (Tensor, Tensor)"
)
_lib.define(
    "prune(Tensor source, Tensor target, Tensor positions, int[] keep, *, int[]? seg_lens=None, "
    f"{_COST_ARGS}, float eps={D.EPS!r}, float tau={D.TAU!r}, int n_iters={D.N_ITERS}, float tol={D.TOL!r}, "
    f"float recover_ratio={D.RECOVER_RATIO!r}, bool check_finite=True, int? max_workspace=None, "
    "str backend='auto') -> (Tensor, Tensor)"
)
# Native entry points (implemented in csrc/). Inputs are normalised by the public op:
# cost_matrix_native: source (B,n,d), target (B,m,d), src_pos (B,n,2) f32, tgt_pos (B,m,2) f32.
# sinkhorn_native: cost (B,n,m) f32 contiguous, log_a (B,n)/log_b (B,m) f32 or None for uniform;
#   tau_a/tau_b the marginals' KL weights (inf: exact).
# prune_native: packed source/target (T,d) with unit stride on d, positions (T,2) or, for a padded
#   batch, the shared (n,2) f32 contiguous; `padded` makes kept indices local to each segment.
#   Returns (kept int64 (sum(keep),), scores f32 (T,), nonfinite int32 (1,): nonzero when any
#   feature or position was non-finite; only written when check_finite is true). A padded batch
#   may come as (B, n, d): kept (B, keep) and scores (B, n) then. max_workspace: the cost buffer's
#   cap in bytes, 0 for the default (docs: topv.defaults.WORKSPACE_*).
_lib.define(
    "cost_matrix_native(Tensor source, Tensor target, Tensor src_pos, Tensor tgt_pos, "
    "float alpha, float beta, float gamma, float sigma) -> Tensor"
)
_lib.define(
    "sinkhorn_native(Tensor cost, Tensor? log_a, Tensor? log_b, float eps, int n_iters, float tol, float tau_a, "
    "float tau_b) -> (Tensor, Tensor)"
)
_lib.define(
    "prune_native(Tensor source, Tensor target, Tensor positions, int[] seg_lens, int[] keep, "
    "bool padded, float alpha, float beta, float gamma, float sigma, float eps, float tau, int n_iters, "
    "float tol, float recover_ratio, bool check_finite, int max_workspace) -> (Tensor, Tensor, Tensor)"
)


# --------------------------------------------------------------------------------------------
# Segments: the host-side description of a batch, with device tables cached per device.
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Segments:
    """Segment layout of one ``prune`` call: host tuples plus cached device tables.

    ``padded`` batches have equal segments, indices local to each segment and positions shared
    or per segment. Instances are cached by layout (``Segments.of``), so device tables are built
    once (outside any CUDA-graph capture, on the first eager call) and reused.
    """

    lens: tuple[int, ...]
    keep: tuple[int, ...]
    padded: bool
    starts: tuple[int, ...] = field(init=False)
    out_starts: tuple[int, ...] = field(init=False)
    lens_list: list[int] = field(init=False, repr=False)  # as the native ops take them
    keep_list: list[int] = field(init=False, repr=False)
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.lens_list, self.keep_list = list(self.lens), list(self.keep)
        starts, out_starts, s, o = [], [], 0, 0
        for n, k in zip(self.lens, self.keep):
            starts.append(s)
            out_starts.append(o)
            s += n
            o += k
        self.starts, self.out_starts = tuple(starts), tuple(out_starts)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def of(lens: tuple[int, ...], keep: tuple[int, ...], padded: bool) -> Segments:
        return Segments(lens, keep, padded)

    @property
    def count(self) -> int:
        return len(self.lens)

    @property
    def total_keep(self) -> int:
        return self.out_starts[-1] + self.keep[-1]

    def cached(self, device: torch.device, name: str, build):
        """A per-device table built once by ``build(self, device)`` and kept with this layout."""
        key = (str(device), name)
        if key not in self._device_cache:
            self._device_cache[key] = build(self, device)
        return self._device_cache[key]


class PruneParams(NamedTuple):  # a NamedTuple: built on every call, in well under a microsecond
    alpha: float
    beta: float
    gamma: float
    sigma: float
    eps: float
    tau: float
    n_iters: int
    tol: float
    recover_ratio: float


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def _impl(name: str):
    # CompositeExplicitAutograd: one Python kernel for every device (the reference backend runs
    # anywhere); Meta and FakeTensor dispatch go to the fake kernels registered below.
    return torch.library.impl(_lib, name, "CompositeExplicitAutograd")


_MODE_KEYS = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # FAKE, PROXY, FUNCTIONAL


def traced(*tensors) -> bool:
    """Whether a call must go through the dispatcher rather than run its kernel directly:
    torch.compile, an active dispatch mode (FakeTensor, make_fx, functionalisation, any user mode),
    or tensor subclasses. Costs ~1 µs."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or any(torch._C._get_dispatch_mode(k) is not None for k in _MODE_KEYS)
            or any(type(t) is not torch.Tensor for t in tensors if t is not None))


# --------------------------------------------------------------------------------------------
# cost_matrix
# --------------------------------------------------------------------------------------------


def _check_cost_matrix(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma):
    V.tensor("source", source, ndims=(2, 3), dtypes=V.FEATURE_DTYPES)
    V.tensor("target", target, ndims=(source.dim(),), dtypes=V.FEATURE_DTYPES)
    if target.dtype != source.dtype:
        raise TypeError(f"source and target must share a dtype, got {source.dtype} and {target.dtype}")
    batch = source.shape[0] if source.dim() == 3 else None
    if batch is not None and target.shape[0] != batch:
        raise ValueError(f"source and target must have the same batch size, got {source.shape[0]} and {target.shape[0]}")
    if target.shape[-1] != source.shape[-1]:
        raise ValueError(f"source and target must have the same feature size d, got {source.shape[-1]} and {target.shape[-1]}")
    n, m = source.shape[-2], target.shape[-2]
    if n < 1 or m < 1 or source.shape[-1] < 1:
        raise ValueError(f"source and target need at least one token and one feature, got {tuple(source.shape)} and {tuple(target.shape)}")
    V.positions("src_pos", src_pos, n, batch)
    if tgt_pos is not None:
        V.positions("tgt_pos", tgt_pos, m, batch)
    elif m != n:
        raise ValueError(f"tgt_pos is required when target has a different token count than source (n={n}, m={m})")
    V.same_device(source=source, target=target, src_pos=src_pos, tgt_pos=tgt_pos)
    V.cost_params(alpha, beta, gamma, sigma)


def _batched_pos(pos: torch.Tensor, batch: int) -> torch.Tensor:
    pos = pos.to(torch.float32)
    return pos.expand(batch, *pos.shape[-2:]) if pos.dim() == 2 else pos


def cost_matrix_eager(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma, backend):
    """The kernel of ``topv::cost_matrix``."""
    _check_cost_matrix(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma)
    run = backends.resolve(backend, source.device).launchers
    squeeze = source.dim() == 2
    s, t = (source[None], target[None]) if squeeze else (source, target)
    B = s.shape[0]
    p = _batched_pos(src_pos, B)
    q = p if tgt_pos is None else _batched_pos(tgt_pos, B)
    out = run.cost_matrix(s, t, p, q, alpha, beta, gamma, sigma)
    return out[0] if squeeze else out


@_impl("cost_matrix")
def _cost_matrix(source, target, src_pos, tgt_pos=None, *, alpha=D.ALPHA, beta=D.BETA, gamma=D.GAMMA, sigma=D.SIGMA,
                 backend="auto"):
    return cost_matrix_eager(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma, backend)


@torch.library.register_fake("topv::cost_matrix")
def _cost_matrix_fake(source, target, src_pos, tgt_pos=None, *, alpha=D.ALPHA, beta=D.BETA, gamma=D.GAMMA,
                      sigma=D.SIGMA, backend="auto"):
    _check_cost_matrix(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma)
    return source.new_empty((*source.shape[:-1], target.shape[-2]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# sinkhorn
# --------------------------------------------------------------------------------------------


def _check_sinkhorn(cost, a, b, eps, n_iters, tol, tau_a, tau_b):
    V.tensor("cost", cost, ndims=(2, 3), dtypes=(torch.float32,))
    n, m = cost.shape[-2:]
    if n < 1 or m < 1:
        raise ValueError(f"cost must have at least one row and one column, got {tuple(cost.shape)}")
    for name, w, size in (("a", a, n), ("b", b, m)):
        if w is None:
            continue
        V.tensor(name, w, ndims=(1, 2) if cost.dim() == 3 else (1,), dtypes=(torch.float32,))
        ok = w.shape[-1] == size and (w.dim() == 1 or w.shape[0] == cost.shape[0])
        if not ok:
            want = f"({size},)" + (f" or ({cost.shape[0]}, {size})" if cost.dim() == 3 else "")
            raise ValueError(f"{name} must have shape {want} to match cost {tuple(cost.shape)}, got {tuple(w.shape)}")
    V.same_device(cost=cost, a=a, b=b)
    V.sinkhorn_params(eps, n_iters, tol)
    V.relaxation("tau_a", tau_a)
    V.relaxation("tau_b", tau_b)


def _log_weights(w: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if w is None:
        return None
    # One host sync, only when the caller supplies marginals: log(0) would give -inf potentials.
    if not bool((w > 0).all() & torch.isfinite(w).all()):
        raise ValueError(f"marginal {name} must be finite and > 0 everywhere")
    return torch.log(w)


def _exact_if_none(tau):
    return math.inf if tau is None else tau


def sinkhorn_eager(cost, a, b, eps, n_iters, tol, tau_a, tau_b, backend):
    """The kernel of ``topv::sinkhorn`` (tau None: an exact marginal)."""
    tau_a, tau_b = _exact_if_none(tau_a), _exact_if_none(tau_b)
    _check_sinkhorn(cost, a, b, eps, n_iters, tol, tau_a, tau_b)
    run = backends.resolve(backend, cost.device).launchers
    squeeze = cost.dim() == 2
    C = (cost[None] if squeeze else cost).contiguous()
    log_a, log_b = _log_weights(a, "a"), _log_weights(b, "b")  # also validates the marginals
    if log_a is not None:
        log_a = log_a.expand(C.shape[0], C.shape[1]).contiguous()
    if log_b is not None:
        log_b = log_b.expand(C.shape[0], C.shape[2]).contiguous()
    f, g = run.sinkhorn(C, log_a, log_b, eps, n_iters, tol, tau_a, tau_b)
    return (f[0], g[0]) if squeeze else (f, g)


@_impl("sinkhorn")
def _sinkhorn(cost, a=None, b=None, *, eps=D.EPS, n_iters=D.N_ITERS, tol=D.TOL, tau_a=None, tau_b=None, backend="auto"):
    return sinkhorn_eager(cost, a, b, eps, n_iters, tol, tau_a, tau_b, backend)


@torch.library.register_fake("topv::sinkhorn")
def _sinkhorn_fake(cost, a=None, b=None, *, eps=D.EPS, n_iters=D.N_ITERS, tol=D.TOL, tau_a=None, tau_b=None,
                   backend="auto"):
    _check_sinkhorn(cost, a, b, eps, n_iters, tol, _exact_if_none(tau_a), _exact_if_none(tau_b))
    return cost.new_empty(cost.shape[:-1]), cost.new_empty((*cost.shape[:-2], cost.shape[-1]))


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _check_prune(source, target, positions, keep, seg_lens, params: PruneParams):
    """Validate a prune call; return its layout (lens, keep, padded) as host tuples.

    Under torch.compile's dynamic shapes the sizes may be SymInts, so nothing here hashes them.
    """
    V.tensor("source", source, ndims=(2, 3), dtypes=V.FEATURE_DTYPES)
    V.tensor("target", target, ndims=(2, 3), dtypes=V.FEATURE_DTYPES)
    if target.shape != source.shape:
        raise ValueError(f"target must have the same shape as source, got {tuple(target.shape)} and {tuple(source.shape)}")
    if target.dtype != source.dtype:
        raise TypeError(f"source and target must share a dtype, got {source.dtype} and {target.dtype}")
    V.same_device(source=source, target=target, positions=positions if isinstance(positions, torch.Tensor) else None)
    if source.shape[-1] < 1:
        raise ValueError(f"source needs at least one feature, got {tuple(source.shape)}")
    keep = V.int_list("keep", keep)
    V.prune_params(params)
    if source.dim() == 3:
        if seg_lens is not None:
            raise ValueError(
                f"seg_lens is for the packed layout (2-D source (T, d)); got a 3-D padded source {tuple(source.shape)}"
            )
        B, n = source.shape[:2]
        if B < 1 or n < 1:
            raise ValueError(f"padded source must be (B, n, d) with B >= 1 and n >= 1, got {tuple(source.shape)}")
        V.positions("positions", positions, n, B)
        if len(keep) != 1:
            raise ValueError(f"the padded layout takes one keep for every row, got {len(keep)} values: {keep}")
        V.budgets(keep, [n])
        return (n,) * B, (keep[0],) * B, True
    T = source.shape[0]
    if seg_lens is None:
        seg_lens = [T]  # a 2-D source without seg_lens is one segment
    seg_lens = V.int_list("seg_lens", seg_lens)
    if not seg_lens:
        raise ValueError("seg_lens must name at least one segment, got []")
    if any(n < 1 for n in seg_lens):
        raise ValueError(f"every segment needs at least one token, got seg_lens={seg_lens}")
    if sum(seg_lens) != T:
        raise ValueError(f"seg_lens must sum to the packed token count T={T}, got sum={sum(seg_lens)} ({seg_lens})")
    if len(keep) != len(seg_lens):
        raise ValueError(f"keep must give one budget per segment: {len(seg_lens)} segments, got {len(keep)} budgets")
    V.positions("positions", positions, T, None)
    V.budgets(keep, seg_lens)
    return tuple(seg_lens), tuple(keep), False


# Validated call layouts: a repeated call (an engine prunes every request with the same shapes)
# skips the checks. The key holds everything the checks read; a SymInt shape (torch.compile)
# never gets here (the fake kernel checks in full).
_LAYOUTS: dict[tuple, Segments] = {}
_MAX_LAYOUTS = 4096


def _prune_layout(source, target, positions, keep, seg_lens, params: PruneParams) -> Segments:
    key = (source.shape, source.dtype, source.device, source.requires_grad, target.shape, target.dtype,
           target.device, target.requires_grad, type(positions), *(
               (positions.shape, positions.dtype, positions.device, positions.requires_grad)
               if isinstance(positions, torch.Tensor) else ()),
           tuple(keep), None if seg_lens is None else tuple(seg_lens), params)
    segs = _LAYOUTS.get(key)
    if segs is None:
        segs = Segments.of(*_check_prune(source, target, positions, keep, seg_lens, params))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = segs
    return segs


def prune_eager(source, target, positions, keep, seg_lens, params: PruneParams, check_finite, max_workspace, backend):
    """The kernel of ``topv::prune``."""
    segs = _prune_layout(source, target, positions, keep, seg_lens, params)
    if max_workspace is not None:
        V.max_workspace(max_workspace)
    run = backends.resolve(backend, source.device).launchers
    pos = positions if positions.dtype == torch.float32 else positions.float()
    kept, scores, bad = run.prune(source, target, pos.contiguous(), segs, params, check_finite, max_workspace)
    if check_finite and bool(bad.any()):  # the one host sync of a checked call
        raise ValueError(
            "non-finite values (NaN or Inf) in source, target or positions; topv cannot rank such tokens. "
            "Pass check_finite=False to skip this check (then the result is unspecified but still a valid "
            "set of distinct in-range indices)"
        )
    return kept, scores


@_impl("prune")
def _prune(source, target, positions, keep, *, seg_lens=None, alpha=D.ALPHA, beta=D.BETA, gamma=D.GAMMA,
           sigma=D.SIGMA, eps=D.EPS, tau=D.TAU, n_iters=D.N_ITERS, tol=D.TOL, recover_ratio=D.RECOVER_RATIO,
           check_finite=True, max_workspace=None, backend="auto"):
    params = PruneParams(alpha, beta, gamma, sigma, eps, tau, n_iters, tol, recover_ratio)
    return prune_eager(source, target, positions, keep, seg_lens, params, check_finite, max_workspace, backend)


@torch.library.register_fake("topv::prune")
def _prune_fake(source, target, positions, keep, *, seg_lens=None, alpha=D.ALPHA, beta=D.BETA, gamma=D.GAMMA,
                sigma=D.SIGMA, eps=D.EPS, tau=D.TAU, n_iters=D.N_ITERS, tol=D.TOL, recover_ratio=D.RECOVER_RATIO,
                check_finite=True, max_workspace=None, backend="auto"):
    params = PruneParams(alpha, beta, gamma, sigma, eps, tau, n_iters, tol, recover_ratio)
    _, keep, padded = _check_prune(source, target, positions, keep, seg_lens, params)
    if padded:
        return (source.new_empty((source.shape[0], keep[0]), dtype=torch.int64),
                source.new_empty(source.shape[:2], dtype=torch.float32))
    return (source.new_empty((sum(keep),), dtype=torch.int64),
            source.new_empty((source.shape[0],), dtype=torch.float32))


# Native fakes: shapes only (the C++ side checks its inputs with TORCH_CHECK).
@torch.library.register_fake("topv::cost_matrix_native")
def _cost_matrix_native_fake(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma):
    return source.new_empty((source.shape[0], source.shape[1], target.shape[1]), dtype=torch.float32)


@torch.library.register_fake("topv::sinkhorn_native")
def _sinkhorn_native_fake(cost, log_a, log_b, eps, n_iters, tol, tau_a, tau_b):
    return cost.new_empty(cost.shape[:2]), cost.new_empty((cost.shape[0], cost.shape[2]))


@torch.library.register_fake("topv::prune_native")
def _prune_native_fake(source, target, positions, seg_lens, keep, padded, alpha, beta, gamma, sigma, eps, tau,
                       n_iters, tol, recover_ratio, check_finite, max_workspace):
    if source.dim() == 3:
        return (source.new_empty((source.shape[0], keep[0]), dtype=torch.int64),
                source.new_empty(source.shape[:2], dtype=torch.float32), source.new_empty((1,), dtype=torch.int32))
    return (source.new_empty((sum(keep),), dtype=torch.int64),
            source.new_empty((source.shape[0],), dtype=torch.float32),
            source.new_empty((1,), dtype=torch.int32))


from topv import _ext  # noqa: E402  (loads topv._C, which registers the native kernels, after the schemas exist)

_ext.load()
