"""Shared fixtures and skip rules for the whole suite (CPU CI and the H100 run the same command).

On a machine without a GPU the Triton kernels run under the Triton interpreter, which must be
switched on before any kernel is defined, i.e. before ``topv.triton_kernels`` is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import topv  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST_BACKENDS = ("triton", "cuda", "cpp")


def backend_cases(include_reference=False):
    """(backend, device) pairs for every fast path, skipped with a reason where unavailable."""
    cases = []
    for device in ("cpu", "cuda"):
        for backend in (("reference",) if include_reference else ()) + FAST_BACKENDS:
            if (backend == "cuda") != (device == "cuda") and backend in ("cuda", "cpp"):
                continue  # "cuda" runs CUDA tensors, "cpp" CPU tensors
            reason = None
            if device == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device"
            elif backend not in topv.available_backends(device):
                reason = f"backend {backend!r} not available on {device}"
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            cases.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return cases


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
