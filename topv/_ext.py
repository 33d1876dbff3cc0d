"""Best-effort loading of the C++ extension ``topv._C``.

``_C`` has no Python API: importing it loads the shared library, whose static initialisers
register the native kernels (``TORCH_LIBRARY_IMPL(topv, CPU|CUDA, m)``) against the schemas that
:mod:`topv.ops` defines. ``import topv`` works without it; asking for ``backend="cuda"``/``"cpp"``
then raises an error that carries the load error below.
"""

from __future__ import annotations

import importlib

_state: dict[str, object] = {"loaded": False, "error": "not attempted"}


def load() -> bool:
    if _state["loaded"]:
        return True
    try:
        importlib.import_module("topv._C")
    except (ImportError, OSError) as e:  # not built, or built against another torch
        _state["error"] = f"{type(e).__name__}: {e}"
        return False
    _state["loaded"], _state["error"] = True, None
    return True


def loaded() -> bool:
    return bool(_state["loaded"])


def load_error() -> str | None:
    return _state["error"]
