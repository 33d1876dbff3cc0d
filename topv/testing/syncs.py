"""Counting host synchronisations on any device, CPU included.

On a GPU a host synchronisation is any operation whose result the host must wait for: reading a
value (``.item()``, ``bool(t)``, ``tolist()``), an output whose size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without
``output_size``), a copy to the host. :class:`SyncCounter` flags those operations as they are
dispatched, whatever the device, so a CPU test can hold code to "no sync inside the language
model's forward" (``torch.cuda.set_sync_debug_mode`` semantics, emulated). Each flagged
operation is recorded with the innermost frame of the code that caused it and, when ``attribute``
is given, whether that code lies under that path (for example ``topv/integrations``);
``count_ops`` also lists every operation that code dispatches.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_DATA_DEPENDENT = {
    aten._local_scalar_dense.default,  # .item(), bool(), int(), float()
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
_COMPOSITE = torch._C.DispatchKey.CompositeExplicitAutograd
_SELF_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass
class Sync:
    op: str
    where: str  # file:line of the innermost frame outside torch and this module
    attributed: bool  # that frame (or one of its callers) lies under the attributed path


@dataclass
class SyncCounter:
    """``with SyncCounter(attribute="topv/integrations") as c: ...``; ``c.syncs`` lists them.

    ``active`` can be switched off and on inside the block to count a window only (for example
    from a language model's pre-hook to its forward hook)."""

    attribute: str | None = None
    active: bool = True
    count_ops: bool = False  # also list every op the attributed code dispatches (``ops``)
    syncs: list[Sync] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._mode = _Mode(self)
        self._patched: list = []

    @property
    def count(self) -> int:
        return len(self.syncs)

    def attributed(self) -> list[Sync]:
        return [s for s in self.syncs if s.attributed]

    def record(self, op: str) -> None:
        if self.active:
            where, attributed = self._caller()
            self.syncs.append(Sync(op, where, attributed))

    def record_op(self, op: str) -> None:
        if self.active and self._caller()[1]:
            self.ops.append(op)

    def _caller(self) -> tuple[str, bool]:
        frame, where, attributed = sys._getframe(3), None, False
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            if not path.startswith(_TORCH_DIR) and path != _SELF_FILE:
                if where is None:
                    where = f"{os.path.relpath(path)}:{frame.f_lineno}"
                if self.attribute is not None and self.attribute in path.replace(os.sep, "/"):
                    attributed = True
                    break
            frame = frame.f_back
        return where or "?", attributed

    def __enter__(self):
        self._mode.__enter__()
        # Reads that do not dispatch an op on a CPU tensor (tolist, numpy) are caught here.
        for cls, name in ((torch.Tensor, "tolist"), (torch.Tensor, "numpy")):
            orig = getattr(cls, name)

            def wrapped(t, *a, _orig=orig, _name=name, **k):
                self.record(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            setattr(cls, name, wrapped)
            self._patched.append((cls, name, orig))
        return self

    def __exit__(self, *exc):
        for cls, name, orig in reversed(self._patched):
            setattr(cls, name, orig)
        self._patched.clear()
        return self._mode.__exit__(*exc)


class _Mode(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter.count_ops:
            self.counter.record_op(str(func))
        if func in _DATA_DEPENDENT and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.counter.record(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
                self.counter.record(f"{func} (boolean mask)")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst_device = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if (isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None
                    and torch.device(dst_device).type == "cpu"):
                self.counter.record(f"{func} (device to host)")
        if func.namespace != "aten" and func.has_kernel_for_dispatch_key(_COMPOSITE):
            # A custom op with a Python kernel (topv's ops): look inside it too.
            with self:
                return func._op_dk(_COMPOSITE, *args, **kwargs)
        return func(*args, **kwargs)
