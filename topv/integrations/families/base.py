"""What every family provides: the image segments of a prefill, read from the model's own inputs.

A family is a pure description of one model type's token layout. :meth:`Family.segments` takes host
tensors (``input_ids`` and the processor outputs it names in ``inputs``) and returns
:class:`~topv.integrations.records.Segment` s; it keeps no state between calls and installs
nothing, so a serving engine can call it directly. Where the layout is written nowhere but in the
embeddings, :meth:`Family.embed_inputs` derives the missing input from them on the device (read
to the host with the rest). The vision stage adds two more: :meth:`Family.vision_tokens` turns an
encoder layer's states into language-model tokens (device ops), :meth:`Family.vision_rows` says
which of them each scored token is (host). The model accessors at the end are what the Hugging
Face engine needs besides the layout.
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


def feature_layer(vision_feature_layer, n_layers: int, name: str) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]`` (``hidden_states[0]``
    is the encoder's input, ``hidden_states[j]`` layer j-1's output)."""
    v = vision_feature_layer
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"topv: stage='vision' scores one encoder layer; {name}'s vision_feature_layer is {v!r}")
    if not -(n_layers + 1) <= v <= n_layers or v % (n_layers + 1) == 0:
        raise ValueError(f"topv: stage='vision' scores the encoder layer whose output the model uses; {name}'s "
                         f"vision_feature_layer {v} selects no layer's output of its {n_layers}-layer encoder")
    return v % (n_layers + 1) - 1


def submodule(module, path: str, name: str):
    """``module.<path>`` (dotted), or a TypeError saying which part the vision stage expected."""
    for part in path.split("."):
        if not hasattr(module, part):
            raise TypeError(f"topv: stage='vision' expects {name}'s vision encoder at .{path}; "
                            f"{type(module).__name__} has no .{part}")
        module = getattr(module, part)
    return module


class Family:
    """One model type's layout of image tokens.

    ``inputs`` names the processor outputs :meth:`segments` reads (besides ``input_ids``), so a
    caller knows what to bring to the host. ``encoder_inputs`` names the arguments of the model's
    ``get_image_features`` that :meth:`vision_rows` needs per encoder call (LLaVA-NeXT: the image
    sizes, which ``generate`` gives the encoder only). ``rope_axes`` is 3 for M-RoPE positions."""

    name = ""  # as users know the family, for messages
    classes = ""  # the transformers classes, for messages
    inputs: tuple[str, ...] = ()
    encoder_inputs: tuple[str, ...] = ()
    rope_axes = 1

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

    # ---- the vision stage -----------------------------------------------------------------

    def vision_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """One encoder call's states at the capture layer (as that layer sees them: its input, or
        its norm's output) -> (tokens, d) at language-model granularity, in the encoder's order.
        Device ops only."""
        raise NotImplementedError

    def vision_rows(self, segments: list[Segment], calls: list[dict]) -> tuple[torch.Tensor, int]:
        """For every scored token of ``segments`` (packed, in order), its row among the tokens
        :meth:`vision_tokens` gives for the prefill's encoder calls, concatenated in call order;
        and the number of those rows. ``calls`` holds, per call, host copies of the arguments
        named in ``encoder_inputs``. Raises ``ValueError`` when they contradict the segments."""
        raise NotImplementedError

    # ---- model accessors for the Hugging Face engine -------------------------------------

    def vision_layer(self, model) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The vision stage's capture point: the encoder layer whose output the model uses (its
        input is the source) and that layer's norm after its attention block (its output is the
        target)."""
        raise TypeError(f"topv: stage='vision' does not support {self.name}")

    @staticmethod
    def language_model(model):
        return model.model.language_model

    def decode_positions(self, model, start: int, batch: int, q: int, device) -> torch.Tensor | None:
        """Positions of q new tokens at unpruned position ``start`` when the caller gave none
        (``kv="all"``: the model would read them off its shorter cache); None: plain 1-D RoPE,
        which the engine fills in itself."""
        return None
