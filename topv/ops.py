"""The ``topv`` operator library: schemas, fake kernels, validation and backend routing.

Python owns every ``topv::`` schema, so ``torch.ops.topv.*`` and its fake kernel exist on any
machine, with or without the C++ extension or Triton. Two families:

* public ops ``topv::cost_matrix``, ``topv::sinkhorn``, ``topv::prune``: validate their
  arguments (host-side only), resolve ``backend`` and run it. One Python kernel serves every
  device (CompositeExplicitAutograd); fake kernels serve Meta/FakeTensor.
* native ops ``topv::cost_matrix_native``, ``topv::sinkhorn_native``, ``topv::prune_native``:
  raw entry points into the C++ extension (``topv._C``), which registers their CPU and CUDA
  kernels with ``TORCH_LIBRARY_IMPL``. They take already-normalised inputs and are what a C++
  stack calls through the dispatcher; the public ops route ``backend="cuda"``/``"cpp"`` to them.

Backends: ``reference`` (eager PyTorch, any device), ``triton`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``), ``cuda`` (C++ extension on CUDA tensors), ``cpp`` (C++ extension on
CPU tensors). ``auto`` picks the fastest available one. Asking for an unavailable backend raises;
nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from topv import _validate as V
from topv import reference

BACKENDS = ("auto", "reference", "triton", "cuda", "cpp")

_lib = torch.library.Library("topv", "DEF")  # kept alive at module level: it owns the schemas

_COST_ARGS = "float alpha=1.0, float beta=1.0, float gamma=0.3, float sigma=0.2"
_SINKHORN_ARGS = "float eps=0.1, int n_iters=3, float tol=0.0"
_lib.define(
    "cost_matrix(Tensor source, Tensor target, Tensor src_pos, Tensor? tgt_pos=None, *, "
    f"{_COST_ARGS}, str backend='auto') -> Tensor"
)
_lib.define(f"sinkhorn(Tensor cost, Tensor? a=None, Tensor? b=None, *, {_SINKHORN_ARGS}, str backend='auto') -> (Tensor, Tensor)")
_lib.define(
    "prune(Tensor source, Tensor target, Tensor positions, int[] keep, *, int[]? seg_lens=None, "
    f"{_COST_ARGS}, {_SINKHORN_ARGS}, float recover_ratio=0.25, bool check_finite=True, "
    "str backend='auto') -> (Tensor, Tensor)"
)
# Native entry points (implemented in csrc/). Inputs are normalised by the public op:
# cost_matrix_native: source (B,n,d), target (B,m,d), src_pos (B,n,2) f32, tgt_pos (B,m,2) f32.
# sinkhorn_native: cost (B,n,m) f32 contiguous, log_a (B,n)/log_b (B,m) f32 or None for uniform.
# prune_native: packed source/target (T,d) with unit stride on d, positions (T,2) or, for a padded
#   batch, the shared (n,2) f32 contiguous; `padded` makes kept indices local to each segment.
#   Returns (kept int64 (sum(keep),), scores f32 (T,), nonfinite int32 (1,): nonzero when any
#   feature or position was non-finite; only written when check_finite is true).
_lib.define(
    "cost_matrix_native(Tensor source, Tensor target, Tensor src_pos, Tensor tgt_pos, "
    "float alpha, float beta, float gamma, float sigma) -> Tensor"
)
_lib.define("sinkhorn_native(Tensor cost, Tensor? log_a, Tensor? log_b, float eps, int n_iters, float tol) -> (Tensor, Tensor)")
_lib.define(
    "prune_native(Tensor source, Tensor target, Tensor positions, int[] seg_lens, int[] keep, "
    "bool padded, float alpha, float beta, float gamma, float sigma, float eps, int n_iters, "
    "float tol, float recover_ratio, bool check_finite) -> (Tensor, Tensor, Tensor)"
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
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
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


@dataclass(frozen=True)
class PruneParams:
    alpha: float
    beta: float
    gamma: float
    sigma: float
    eps: float
    n_iters: int
    tol: float
    recover_ratio: float


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401  (imported only when a device could use it)
    except ImportError:
        return False
    # A source tree used without `pip install` lacks the topv.triton_kernels mapping.
    return importlib.util.find_spec("topv.triton_kernels") is not None


def _native_has(op: str, key: str) -> bool:
    from topv import _ext

    return _ext.loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"topv::{op}_native", key)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run tensors on ``device`` in this process (``auto`` excluded)."""
    device = torch.device(device)
    out = ["reference"]
    if (device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())) and _has_triton():
        out.append("triton")
    if device.type == "cuda" and _native_has("prune", "CUDA"):
        out.append("cuda")
    if device.type == "cpu" and _native_has("prune", "CPU"):
        out.append("cpp")
    return out


def _why_unavailable(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if not _has_triton():
            return "Triton or topv.triton_kernels is not importable (install topv with pip so triton_kernels/ maps to it)"
        return "Triton runs CUDA tensors (CPU tensors only when TRITON_INTERPRET=1 is set before topv is imported)"
    if backend in ("cuda", "cpp"):
        from topv import _ext

        if not _ext.loaded():
            return f"the C++ extension topv._C is not built or failed to load ({_ext.load_error()})"
        return f"'{backend}' runs {'CUDA' if backend == 'cuda' else 'CPU'} tensors and topv._C has no such kernel"
    return "unknown reason"


# How `auto` chooses on CUDA, from bench/results/h100 (H100, bf16, 3 iterations, 2026-11-25):
# launched from Python, the CUDA C++ path was the faster one at every prune shape measured (B=1,
# n=576: 70-121 µs against 903-1064 for Triton, whose ~13 launches are host-bound; B=16: 229
# against 814; B=64: 685 against 999; n=2880: 421 against 1013; n=16384: 20.5 against 20.3 ms, a
# tie), and its Sinkhorn alone was too. Replayed from a CUDA graph Triton still wins at B=1 (58
# against 66 µs) and n=2880 (326 against 410), but `auto` does not switch on capture: the eager
# warm-up before a capture must build the same backend's per-layout tables. Pass
# backend="triton" explicitly to capture the fastest replay at those shapes. On CPU the C++
# kernels beat the eager reference 5-6x on bf16 features and ~3x on fp32 at n=576, d=1024
# (bench/results/cpu).
def _auto(device: torch.device, avail: list[str]) -> str:
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    return next((b for b in order if b in avail), "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on ``device`` (``auto`` resolved, availability checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    avail = available_backends(device)
    if backend == "auto":
        return _auto(device, avail)
    if backend not in avail:
        raise ValueError(
            f"backend={backend!r} is not available for tensors on {device}: {_why_unavailable(backend, device)}. "
            f"Available here: {avail}"
        )
    return backend


def _impl(name: str):
    # CompositeExplicitAutograd: one Python kernel for every device (the reference backend runs
    # anywhere); Meta and FakeTensor dispatch go to the fake kernels registered below.
    return torch.library.impl(_lib, name, "CompositeExplicitAutograd")


@functools.cache
def _triton_backend():
    from topv import _triton

    return _triton


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


@_impl("cost_matrix")
def _cost_matrix(source, target, src_pos, tgt_pos=None, *, alpha=1.0, beta=1.0, gamma=0.3, sigma=0.2, backend="auto"):
    _check_cost_matrix(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma)
    backend = resolve_backend(backend, source.device)
    squeeze = source.dim() == 2
    s, t = (source[None], target[None]) if squeeze else (source, target)
    B = s.shape[0]
    p = _batched_pos(src_pos, B)
    q = p if tgt_pos is None else _batched_pos(tgt_pos, B)
    if backend == "reference":
        out = reference.cost_matrix(s, t, p, q, alpha=alpha, beta=beta, gamma=gamma, sigma=sigma).float()
    elif backend == "triton":
        out = _triton_backend().cost_matrix(s, t, p, q, alpha, beta, gamma, sigma)
    else:
        out = torch.ops.topv.cost_matrix_native.default(s, t, p, q, alpha, beta, gamma, sigma)
    return out[0] if squeeze else out


@torch.library.register_fake("topv::cost_matrix")
def _cost_matrix_fake(source, target, src_pos, tgt_pos=None, *, alpha=1.0, beta=1.0, gamma=0.3, sigma=0.2, backend="auto"):
    _check_cost_matrix(source, target, src_pos, tgt_pos, alpha, beta, gamma, sigma)
    return source.new_empty((*source.shape[:-1], target.shape[-2]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# sinkhorn
# --------------------------------------------------------------------------------------------


def _check_sinkhorn(cost, a, b, eps, n_iters, tol):
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


def _log_weights(w: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if w is None:
        return None
    # One host sync, only when the caller supplies marginals: log(0) would give -inf potentials.
    if not bool((w > 0).all() & torch.isfinite(w).all()):
        raise ValueError(f"marginal {name} must be finite and > 0 everywhere")
    return torch.log(w)


@_impl("sinkhorn")
def _sinkhorn(cost, a=None, b=None, *, eps=0.1, n_iters=3, tol=0.0, backend="auto"):
    _check_sinkhorn(cost, a, b, eps, n_iters, tol)
    backend = resolve_backend(backend, cost.device)
    squeeze = cost.dim() == 2
    C = cost[None] if squeeze else cost
    log_a, log_b = _log_weights(a, "a"), _log_weights(b, "b")  # also validates the marginals
    if backend == "reference":
        f, g = reference.sinkhorn(C, a, b, eps=eps, n_iters=n_iters, tol=tol)
        f, g = f.float(), g.float()
    else:
        if log_a is not None:
            log_a = log_a.expand(C.shape[0], C.shape[1]).contiguous()
        if log_b is not None:
            log_b = log_b.expand(C.shape[0], C.shape[2]).contiguous()
        run = _triton_backend().sinkhorn if backend == "triton" else torch.ops.topv.sinkhorn_native.default
        f, g = run(C.contiguous(), log_a, log_b, eps, n_iters, tol)
    return (f[0], g[0]) if squeeze else (f, g)


@torch.library.register_fake("topv::sinkhorn")
def _sinkhorn_fake(cost, a=None, b=None, *, eps=0.1, n_iters=3, tol=0.0, backend="auto"):
    _check_sinkhorn(cost, a, b, eps, n_iters, tol)
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
    V.cost_params(params.alpha, params.beta, params.gamma, params.sigma)
    V.sinkhorn_params(params.eps, params.n_iters, params.tol)
    V.recover_ratio(params.recover_ratio)
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


def _nonfinite_flag(*tensors: torch.Tensor) -> torch.Tensor:
    bad = torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        bad = bad | ~torch.isfinite(t).all()
    return bad


def _prune_reference(source, target, positions, segs: Segments, p: PruneParams):
    kw = dict(alpha=p.alpha, beta=p.beta, gamma=p.gamma, sigma=p.sigma, eps=p.eps, n_iters=p.n_iters, tol=p.tol,
              recover_ratio=p.recover_ratio)
    if segs.padded:
        pos = _batched_pos(positions, source.shape[0])
        kept, scores = reference.prune_padded(source, target, pos, segs.keep[0], **kw)
    else:
        kept, scores = reference.prune_packed(source, target, positions.float(), list(segs.lens), list(segs.keep), **kw)
    return kept, scores.float()


def _packed_rows(x: torch.Tensor) -> torch.Tensor:
    """(T, d) with unit stride on d: a view when the layout allows, else one copy."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@_impl("prune")
def _prune(source, target, positions, keep, *, seg_lens=None, alpha=1.0, beta=1.0, gamma=0.3, sigma=0.2, eps=0.1,
           n_iters=3, tol=0.0, recover_ratio=0.25, check_finite=True, backend="auto"):
    params = PruneParams(alpha, beta, gamma, sigma, eps, n_iters, tol, recover_ratio)
    segs = Segments.of(*_check_prune(source, target, positions, keep, seg_lens, params))
    backend = resolve_backend(backend, source.device)
    if backend == "reference":
        bad = _nonfinite_flag(source, target, positions) if check_finite else None
        kept, scores = _prune_reference(source, target, positions, segs, params)
    else:
        pos = positions.to(torch.float32)
        if segs.padded and pos.dim() == 3:
            pos = pos.reshape(-1, 2)
        pos = pos.contiguous()
        src, tgt = _packed_rows(source), _packed_rows(target)
        if backend == "triton":
            kept, scores, bad = _triton_backend().prune(src, tgt, pos, segs, params, check_finite)
        else:
            kept, scores, bad = torch.ops.topv.prune_native.default(
                src, tgt, pos, list(segs.lens), list(segs.keep), segs.padded, alpha, beta, gamma, sigma, eps,
                n_iters, tol, recover_ratio, check_finite)
        if segs.padded:
            kept, scores = kept.view(segs.count, segs.keep[0]), scores.view(source.shape[:2])
    if check_finite and bool(bad.any()):  # the one host sync of a checked call
        raise ValueError(
            "non-finite values (NaN or Inf) in source, target or positions; topv cannot rank such tokens. "
            "Pass check_finite=False to skip this check (then the result is unspecified but still a valid "
            "set of distinct in-range indices)"
        )
    return kept, scores


@torch.library.register_fake("topv::prune")
def _prune_fake(source, target, positions, keep, *, seg_lens=None, alpha=1.0, beta=1.0, gamma=0.3, sigma=0.2,
                eps=0.1, n_iters=3, tol=0.0, recover_ratio=0.25, check_finite=True, backend="auto"):
    params = PruneParams(alpha, beta, gamma, sigma, eps, n_iters, tol, recover_ratio)
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
def _sinkhorn_native_fake(cost, log_a, log_b, eps, n_iters, tol):
    return cost.new_empty(cost.shape[:2]), cost.new_empty((cost.shape[0], cost.shape[2]))


@torch.library.register_fake("topv::prune_native")
def _prune_native_fake(source, target, positions, seg_lens, keep, padded, alpha, beta, gamma, sigma, eps, n_iters,
                       tol, recover_ratio, check_finite):
    return (source.new_empty((sum(keep),), dtype=torch.int64),
            source.new_empty((source.shape[0],), dtype=torch.float32),
            source.new_empty((1,), dtype=torch.int32))


from topv import _ext  # noqa: E402  (loads topv._C, which registers the native kernels, after the schemas exist)

_ext.load()
