"""topv: fused GPU kernels for TopV visual-token pruning (CVPR 2025, arXiv 2503.18278).

Public API: :func:`prune`, :func:`cost_matrix`, :func:`sinkhorn`, :func:`grid_positions`, the
same ops as ``torch.ops.topv.*``, the serving-engine contract (:func:`kept_count`,
:func:`select_tokens`; ``topv.serving``), and the Hugging Face integration (:func:`enable`,
:func:`apply`, :func:`remove`), which imports transformers only when called.
"""

from topv import defaults
from topv.api import cost_matrix, grid_positions, prune, sinkhorn
from topv.ops import available_backends
from topv.serving import kept_count, select_tokens

__version__ = "0.1.0"

__all__ = ["prune", "cost_matrix", "sinkhorn", "grid_positions", "available_backends", "defaults", "kept_count",
           "select_tokens", "enable", "apply", "remove"]


def __getattr__(name):
    # The integration imports transformers lazily: only when one of these is first touched.
    if name in ("enable", "apply", "remove"):
        from topv.integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module 'topv' has no attribute {name!r}")
