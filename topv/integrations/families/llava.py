"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every image is s x s patch tokens in row-major
order (s = image_size / patch_size), plus a leading CLS feature under the ``full`` feature strategy
(kept, not scored). Images may sit back to back, so a row's image tokens are cut every s*s (+1).

Vision stage: the CLIP (or SigLIP) encoder layer whose output ``vision_feature_layer`` selects; each
image is one encoder item whose last s*s tokens are the patches, one language-model token each."""

from __future__ import annotations

import torch

from topv.integrations.families.base import Family, feature_layer, grid, submodule
from topv.integrations.records import Segment


def clip_layer(model, config, name: str):
    """The CLIP/SigLIP encoder layer whose output ``config.vision_feature_layer`` selects, and its
    post-attention norm (``layer_norm2``)."""
    tower = submodule(model, "model.vision_tower", name)
    tower = getattr(tower, "vision_model", tower)  # some transformers versions wrap the encoder in .vision_model
    layers = submodule(tower, "encoder.layers", name)
    layer = layers[feature_layer(config.vision_feature_layer, len(layers), name)]
    return layer, submodule(layer, "layer_norm2", name)


def clip_patches(x: torch.Tensor, side: int) -> torch.Tensor:
    """(items, [CLS +] side*side, d) encoder states -> (items * side*side, d): the patch rows, one
    language-model token each (the encoder's CLS token, if any, comes first)."""
    return x[:, x.shape[1] - side * side:].reshape(-1, x.shape[-1])


class Llava(Family):
    name = "LLaVA-1.5"
    classes = "LlavaForConditionalGeneration"

    def __init__(self, config, image_newline=None):
        super().__init__(config)
        vc = config.vision_config
        self.token_id = config.image_token_id
        self.side = vc.image_size // vc.patch_size
        self.cls = getattr(config, "vision_feature_select_strategy", "default") == "full"

    def segments(self, input_ids, inputs=None):
        per_image = self.side * self.side + int(self.cls)
        pos = grid(self.side, self.side)
        out = []
        for b in range(input_ids.shape[0]):
            where = (input_ids[b] == self.token_id).nonzero().flatten()
            if where.numel() % per_image:
                raise ValueError(f"topv: row {b} holds {where.numel()} image tokens, not a multiple of the "
                                 f"{per_image} tokens of one {self.name} image")
            for img in where.view(-1, per_image):
                head = img[: int(self.cls)]
                out.append(Segment(b, img[int(self.cls):], pos, "image", head, (1, self.side, self.side)))
        return out

    def vision_tokens(self, x):
        return clip_patches(x, self.side)

    def vision_rows(self, segments, calls):
        s2 = self.side * self.side
        return torch.arange(len(segments) * s2), len(segments) * s2

    def vision_layer(self, model):
        return clip_layer(model, self.config, self.name)
