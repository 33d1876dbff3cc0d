"""Pruning inside the prefill of Hugging Face VLMs: :func:`enable`, :func:`apply`, :func:`remove`.

``topv.enable(model, keep_ratio=0.25)`` installs the hook engine (``engine.py``) with the family
of ``model`` (``families/``) and the scorer of ``method`` (``scorers/``), pruning after decoder
layer K (``stage="layer"``, the paper's placement) or before the language model
(``stage="vision"``, what serving engines accept); ``docs/integration.md`` is the full statement.
Every argument is checked here, before any hook goes on; transformers is imported only when
:func:`apply` is called.
"""

from __future__ import annotations

import contextlib
import warnings

from topv import defaults as D
from topv.integrations.engine import Settings, TopVSession
from topv.integrations.families import FAMILIES, family_for, supported_families
from topv.integrations.masks import is_flash
from topv.integrations.records import PrefillInfo, Segment
from topv.integrations.scorers import METHODS, Scorer, make_scorer

# Versions on which the whole integration test suite was run (docs/integration.md says where).
MIN_VERSION = (5, 17)
VERIFIED = ("5.17.0", "5.24.0", "5.25.0")

_SESSION_ATTR = "_topv_session"
_warned_version = False


def _check_version():
    import transformers

    global _warned_version
    v = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if v < MIN_VERSION:
        raise RuntimeError(f"topv's transformers integration needs transformers >= "
                           f"{'.'.join(map(str, MIN_VERSION))}; found {transformers.__version__}")
    if v > tuple(int(x) for x in VERIFIED[-1].split(".")[:2]) and not _warned_version:
        _warned_version = True  # once per process, not on every apply
        warnings.warn(f"topv: transformers {transformers.__version__} is newer than the versions the integration "
                      f"was verified on ({', '.join(VERIFIED)})", stacklevel=3)


_PRUNE_DEFAULTS = dict(D.PRUNE, max_workspace=None, backend="auto")


def _scorer_of(method, scorer, check_finite, prune_kwargs) -> Scorer:
    changed = {k: v for k, v in prune_kwargs.items() if v != _PRUNE_DEFAULTS[k]}
    if scorer is not None:
        if not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a topv.integrations.scorers.Scorer, got {type(scorer).__name__}")
        if method != "topv" or changed:
            raise ValueError("give either scorer= (configured itself) or method= with its arguments, not both; got "
                             f"scorer={scorer!r} with method={method!r}{''.join(f', {k}={v!r}' for k, v in changed.items())}")
        return scorer
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if changed and not METHODS[method].prune_arguments:
        raise ValueError(f"{', '.join(changed)} configure method='topv'; method={method!r} takes none of them "
                         f"(got {', '.join(f'{k}={v!r}' for k, v in changed.items())})")
    return make_scorer(method, check_finite=check_finite, **prune_kwargs)


STAGES = ("layer", "vision")
POSITIONS = ("original", "compact")


def apply(model, *, keep_ratio: float | None = None, keep: int | None = None, method: str = "topv",
          scorer: Scorer | None = None, stage: str = "layer", layer: int = D.LAYER, kv: str = "after_k",
          positions: str = "original", alpha: float = D.ALPHA,
          beta: float = D.BETA, gamma: float = D.GAMMA, sigma: float = D.SIGMA, eps: float = D.EPS,
          tau: float = D.TAU, n_iters: int = D.N_ITERS, tol: float = D.TOL,
          recover_ratio: float = D.RECOVER_RATIO, check_finite: bool = True, max_workspace: int | None = None,
          backend: str = "auto") -> TopVSession:
    """Install visual-token pruning on one model instance; undo with :func:`remove`.

    Parameters
    ----------
    model : a supported Hugging Face VLM (see :func:`supported_families`)
    keep_ratio : fraction of each image's scored tokens to keep: ``round(keep_ratio * n)``, at
        least 1 (exact per image). Give this or ``keep``.
    keep : tokens to keep per image (``min(keep, n)``).
    method : ``"topv"`` (the paper's optimal transport, our ops), ``"fastv"`` (layer K-1's
        last-token attention, as published), ``"random"`` (seeded), ``"uniform"`` (evenly spaced on
        the grid) or ``"dart"`` (duplication-aware); ``scorer=`` takes a custom
        :class:`~topv.integrations.scorers.Scorer` instead.
    stage : ``"layer"`` (the paper's placement: scored at decoder layer K, layers > K see the kept
        tokens) or ``"vision"`` (scored in the vision encoder, at the layer whose output the model
        uses; every decoder layer and the whole KV cache see only the kept tokens). The vision
        stage takes every method that reads no attention weights.
    layer : K, stage "layer" only. Layers 0..K see every token and layers > K the kept ones
        (FastV: layers 0..K-1 and K.., as published); needs the last full layer < num_layers - 1.
    kv : stage "layer" only: ``"after_k"`` (layers <= K keep every token in the KV cache) or
        ``"all"`` (after the prefill the pruned tokens are evicted from layers <= K too; one length
        for all layers). The vision stage caches only the kept tokens in every layer.
    positions : ``"original"`` (kept tokens keep their positions in the unpruned prompt, decoding
        continues after its length) or, stage "vision" only, ``"compact"`` (the positions of the
        shortened sequence, as a model handed it without positions would use; M-RoPE's three axes
        then equal).
    alpha, beta, gamma, sigma, eps, tau, n_iters, tol, recover_ratio, max_workspace, backend : passed
        to :func:`topv.prune` unchanged (``method="topv"`` only); defaults from ``topv.defaults``.
    check_finite : raise on NaN/Inf in what the method reads (one host sync per prefill); False
        for a prefill without host synchronisation.

    Returns the :class:`TopVSession` (its ``last`` attribute describes the latest prefill).
    """
    _check_version()
    if (keep_ratio is None) == (keep is None):
        raise ValueError(f"give exactly one of keep_ratio and keep; got keep_ratio={keep_ratio!r}, keep={keep!r}")
    if keep_ratio is not None and not (isinstance(keep_ratio, (int, float)) and not isinstance(keep_ratio, bool)
                                       and 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    vision = stage == "vision"
    if vision:
        # As for the pruning arguments of other methods: a value other than the default is an error.
        for name, value, default, what in (
                ("layer", layer, D.LAYER, "the decoder layer K that stage='layer' scores at"),
                ("kv", kv, "after_k", "which layers of stage='layer' keep the pruned tokens")):
            if value != default:
                raise ValueError(f"{name} chooses {what}; stage='vision' scores the vision encoder and no layer or "
                                 f"cache ever holds the pruned tokens (got {name}={value!r})")
    else:
        if positions != "original":
            raise ValueError("positions='compact' needs stage='vision'; the layer stage keeps the original positions "
                             "(layers <= K and their cache hold them)")
        if kv not in ("after_k", "all"):
            raise ValueError(f"kv must be 'after_k' or 'all', got {kv!r}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an integer, got {layer!r}")
    chosen = _scorer_of(method, scorer, check_finite,
                        dict(alpha=alpha, beta=beta, gamma=gamma, sigma=sigma, eps=eps, tau=tau, n_iters=n_iters,
                             tol=tol, recover_ratio=recover_ratio, max_workspace=max_workspace, backend=backend))
    if vision and "attention" in chosen.needs:
        supported = [m for m, cls in METHODS.items() if "attention" not in cls.needs]
        raise ValueError(f"method {chosen.name!r} reads attention weights inside the language model; stage='vision' "
                         f"scores before the language model runs: use one of {supported} (or a scorer that needs no "
                         "attention)")
    if getattr(model, _SESSION_ATTR, None) is not None:
        raise RuntimeError("topv is already applied to this model; call topv.remove(model) first")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES or not hasattr(getattr(model, "model", None),
                                                                           "language_model"):
        raise TypeError(f"topv supports {supported_families()}; got {type(model).__name__} "
                        f"(model_type {getattr(config, 'model_type', None)!r})")
    family = family_for(config, image_newline=getattr(model.model, "image_newline", None))
    lm = family.language_model(model)
    n_layers = len(lm.layers)
    if vision:
        family.vision_layer(model)  # the capture point exists and the config's vision_feature_layer names a layer
        if positions == "compact" and not hasattr(lm, "rotary_emb"):
            raise TypeError(f"positions='compact' computes rotary embeddings with the language model's rotary_emb; "
                            f"{type(lm).__name__} has none")
        settings = Settings(keep_ratio, keep, -1, "all", stage, positions)
    else:
        last_full = chosen.last_full_layer(layer)
        if not 0 <= last_full < n_layers - 1:
            lo, hi = layer - last_full, n_layers - 2 + layer - last_full
            raise ValueError(f"layer must be an integer in [{lo}, {hi}] for this {n_layers}-layer model and "
                             f"method {chosen.name!r}, got {layer!r}")
        settings = Settings(keep_ratio, keep, last_full, kv)
    impl = lm.config._attn_implementation
    if impl not in ("sdpa", "eager") and not is_flash(impl):
        raise ValueError(f"topv supports attn_implementation 'sdpa', 'eager' and flash_attention_*; got {impl!r}")
    chosen.check(next(lm.parameters()).device)
    session = TopVSession(model, family, chosen, settings)
    session.install()
    setattr(model, _SESSION_ATTR, session)
    return session


def remove(model) -> bool:
    """Remove pruning from ``model``; returns False when it was not applied. A cache pruned while
    it was on must not be decoded further without it."""
    session = getattr(model, _SESSION_ATTR, None)
    if session is None:
        return False
    session.uninstall()
    delattr(model, _SESSION_ATTR)
    return True


@contextlib.contextmanager
def enable(model, **kwargs):
    """``with topv.enable(model, keep_ratio=0.25): model.generate(...)`` -- :func:`apply` on entry,
    :func:`remove` on exit (also on error). Yields the :class:`TopVSession`."""
    session = apply(model, **kwargs)
    try:
        yield session
    finally:
        remove(model)


def session_of(model) -> TopVSession | None:
    """The active :class:`TopVSession` of ``model``, or None."""
    return getattr(model, _SESSION_ATTR, None)


__all__ = ["apply", "remove", "enable", "session_of", "supported_families", "TopVSession", "PrefillInfo",
           "Segment", "MIN_VERSION", "VERIFIED", "STAGES", "POSITIONS"]
