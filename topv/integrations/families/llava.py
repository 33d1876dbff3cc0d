"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every image is s x s patch tokens in row-major
order (s = image_size / patch_size), plus a leading CLS feature under the ``full`` feature strategy
(kept, not scored). Images may sit back to back, so a row's image tokens are cut every s*s (+1)."""

from __future__ import annotations

from topv.integrations.families.base import Family, grid
from topv.integrations.records import Segment


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
                out.append(Segment(b, img[int(self.cls):], pos, "image", head))
        return out
