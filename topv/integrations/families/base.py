"""What every family provides: the image segments of a prefill, read from the model's own inputs.

A family is a pure description of one model type's token layout. :meth:`Family.segments` takes host
tensors (``input_ids`` and the processor outputs it names in ``inputs``) and returns
:class:`~topv.integrations.records.Segment` s; it keeps no state between calls and installs
nothing, so a serving engine can call it directly. Where the layout is written nowhere but in the
embeddings, :meth:`Family.embed_inputs` derives the missing input from them on the device (read
to the host with the rest). The two model accessors at the end are what the Hugging Face engine
needs besides the layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

import topv
from topv.integrations.records import Segment


@lru_cache(maxsize=64)
def grid(h: int, w: int) -> torch.Tensor:
    """``topv.grid_positions(h, w)`` on the host, shared between calls (read-only)."""
    return topv.grid_positions(h, w)


def runs(where: torch.Tensor) -> list[torch.Tensor]:
    """Split ascending positions into runs of consecutive ones."""
    if where.numel() == 0:
        return []
    cuts = ((where[1:] - where[:-1]) != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(where, cuts.tolist()))


class Family:
    """One model type's layout of image tokens.

    ``inputs`` names the processor outputs :meth:`segments` reads (besides ``input_ids``), so a
    caller knows what to bring to the host."""

    name = ""  # as users know the family, for messages
    classes = ""  # the transformers classes, for messages
    inputs: tuple[str, ...] = ()

    def __init__(self, config, image_newline: torch.Tensor | None = None):
        self.config = config

    def reads_embeds(self, inputs: Mapping) -> bool:
        """True when these inputs do not say the layout and :meth:`embed_inputs` must add to them."""
        return False

    def embed_inputs(self, embeds: torch.Tensor) -> dict:
        """Inputs derived from the embeddings entering the language model (B, T, d), on their device."""
        return {}

    def segments(self, input_ids: torch.Tensor, inputs: Mapping | None = None) -> list[Segment]:
        """The scored image tokens of a prefill, per image, each row's images in reading order.

        ``input_ids`` (B, T) and the tensors in ``inputs`` are host tensors. Raises ``ValueError``
        when the inputs contradict the layout or do not say it."""
        raise NotImplementedError

    # ---- model accessors for the Hugging Face engine -------------------------------------

    @staticmethod
    def language_model(model):
        return model.model.language_model

    def decode_positions(self, model, start: int, batch: int, q: int, device) -> torch.Tensor | None:
        """Positions of q new tokens at unpruned position ``start`` when the caller gave none
        (``kv="all"``: the model would read them off its shorter cache); None: plain 1-D RoPE,
        which the engine fills in itself."""
        return None
