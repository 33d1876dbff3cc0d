"""The backend registry: which backends exist, where each can run (or why not), and what ``auto`` picks.

A backend is a module of launchers (``cost_matrix``, ``sinkhorn``, ``prune``) that take the
normalised inputs :mod:`topv.ops` prepares (the contract is at the top of ``topv/_reference.py``,
the simplest of them) plus one :class:`Backend` entry below. Adding a backend is one launcher module
and one entry; nothing else branches on backend names.

Resolution (``resolve``) is cached per (backend, device type, ``TRITON_INTERPRET``): what is
importable or registered does not change within a process, so a call pays a dict lookup, not the
imports and dispatcher queries behind an availability check.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

NAMES = ("auto", "reference", "triton", "cuda", "cpp")


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


def _triton_unavailable(device: torch.device) -> str | None:
    if not _has_triton():
        return "Triton or topv.triton_kernels is not importable (install topv with pip so triton_kernels/ maps to it)"
    if device.type == "cuda" or (device.type == "cpu" and _triton_interpreted()):
        return None
    return "Triton runs CUDA tensors (CPU tensors only when TRITON_INTERPRET=1 is set before topv is imported)"


def _native_unavailable(name: str, key: str, device_type: str, device: torch.device) -> str | None:
    from topv import _ext

    if not _ext.loaded():
        return f"the C++ extension topv._C is not built or failed to load ({_ext.load_error()})"
    if device.type != device_type or not torch._C._dispatch_has_kernel_for_dispatch_key("topv::prune_native", key):
        return f"'{name}' runs {key} tensors and topv._C has no such kernel"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the launchers
    unavailable: Callable[[torch.device], str | None]  # None when it can run tensors on the device, else why not

    @functools.cached_property
    def launchers(self) -> ModuleType:
        return importlib.import_module(self.module)


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "topv._reference", lambda device: None),
        Backend("triton", "topv._triton", _triton_unavailable),
        Backend("cuda", "topv._native", functools.partial(_native_unavailable, "cuda", "CUDA", "cuda")),
        Backend("cpp", "topv._native", functools.partial(_native_unavailable, "cpp", "CPU", "cpu")),
    )
}

# What `auto` picks, per device type, first available wins (the reference is the last resort).
# From bench/results/nvidia-h100-80gb-hbm3/prune.csv (H100, bf16, 3 iterations, commit 717406a):
# the CUDA C++ path is the fastest at B=1, n=576 (54 µs launched from Python against 387 for
# Triton, whose ~13 launches are host-bound), B=16 (179 against 328), B=64 (507 against 1008) and
# n=16384 (6.6 against 9.9 ms). At n=2880 and 3328 Triton is ahead by 3-4 % (Python: 343 against
# 354 µs, 481 against 502; graph: 326 against 343, 469 against 488); `auto` does not switch per
# shape or on capture (the eager warm-up before a capture must build the same backend's per-layout
# tables): pass backend="triton" for such segments. On CPU the C++ kernels beat the eager reference
# 2-6x at n=576, d=1024 (bench/results/cpu-*/prune.csv).
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run tensors on ``device`` in this process (``auto`` excluded)."""
    device = torch.device(device)
    return [name for name, b in REGISTRY.items() if b.unavailable(device) is None]


@functools.cache
def _resolve(backend: str, device_type: str, interpreted: bool) -> Backend:
    device = torch.device(device_type)
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {list(NAMES)}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ()):
            if REGISTRY[name].unavailable(device) is None:
                return REGISTRY[name]
        return REGISTRY["reference"]
    why = REGISTRY[backend].unavailable(device)
    if why is not None:
        raise ValueError(f"backend={backend!r} is not available for tensors on {device}: {why}. "
                         f"Available here: {available_backends(device)}")
    return REGISTRY[backend]


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs for tensors on ``device`` (``auto`` resolved, availability checked)."""
    return _resolve(backend, device.type, _triton_interpreted())


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The name of the backend that runs for tensors on ``device``."""
    return resolve(backend, torch.device(device)).name
