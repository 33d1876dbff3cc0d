"""Families: where each supported model type puts a prefill's image tokens, keyed by ``model_type``.

Adding a family is one module here (a :class:`~topv.integrations.families.base.Family` subclass)
and one line in :data:`FAMILIES` (``docs/integration.md``, "How to add a family")."""

from __future__ import annotations

from topv.integrations.families.base import Family
from topv.integrations.families.internvl import InternVL
from topv.integrations.families.llava import Llava
from topv.integrations.families.llava_next import LlavaNext
from topv.integrations.families.qwen_vl import QwenVL

FAMILIES: dict[str, type[Family]] = {
    "llava": Llava,
    "llava_next": LlavaNext,
    "qwen2_vl": QwenVL,
    "qwen2_5_vl": QwenVL,
    "internvl": InternVL,
}


def supported_families() -> str:
    return "; ".join(sorted({f"{f.name} ({f.classes})" for f in FAMILIES.values()}))


def family_for(config, image_newline=None) -> Family:
    """The family of ``config.model_type``; ``TypeError`` naming the supported ones otherwise."""
    cls = FAMILIES.get(getattr(config, "model_type", None))
    if cls is None:
        raise TypeError(f"topv supports {supported_families()}; got model_type {getattr(config, 'model_type', None)!r}")
    return cls(config, image_newline=image_newline)


__all__ = ["FAMILIES", "Family", "family_for", "supported_families"]
