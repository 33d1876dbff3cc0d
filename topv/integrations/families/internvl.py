"""InternVL (``InternVLForConditionalGeneration``): an image is one run of ``image_seq_length``
tokens per tile (a q x q grid) between <img> and </img>; with several tiles the last one is the
thumbnail of the whole image.

Tiles share one image plane: tile t of an r x c arrangement covers rows [t // c / r, (t // c + 1) / r)
and columns [t % c / c, (t % c + 1) / c); the thumbnail covers the whole plane. The model is not
told the arrangement (the processor picks it from the aspect ratio), so it is taken as the most
square factorisation with r <= c: exact for 1, 2, 3, 5, 7 tiles and square arrangements, a guess
for, e.g., 6 = 2x3 or 3x2. It only affects the spatial terms of TopV's cost.

Vision stage: the encoder layer ``vision_feature_layer`` selects, run on every tile; pixel shuffle
turns each g x g block of a tile's (q*g) x (q*g) patches (g = 1 / downsample_ratio) into one
language-model token, block (i, j) into token i*q + j, which is scored by the block's mean."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from topv.integrations.families.base import Family, feature_layer, grid, runs, submodule
from topv.integrations.records import Segment


@lru_cache(maxsize=32)
def tile_positions(q: int, tiles: int) -> torch.Tensor:
    """Image-plane positions of ``tiles`` tiles of q x q tokens (the last the thumbnail when tiles > 1)."""
    g = grid(q, q)
    if tiles == 1:
        return g
    n = tiles - 1
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    c = n // r
    t = torch.arange(n)
    corner = torch.stack([(t // c).float() / r, (t % c).float() / c], -1)  # (n, 2)
    tiled = (corner[:, None, :] + g[None] / torch.tensor([float(r), float(c)])).reshape(-1, 2)
    return torch.cat([tiled, g])


class InternVL(Family):
    name = "InternVL"
    classes = "InternVLForConditionalGeneration"

    def __init__(self, config, image_newline=None):
        super().__init__(config)
        self.token_id = config.image_token_id
        self.per_tile = config.image_seq_length
        self.q = math.isqrt(self.per_tile)
        if self.q * self.q != self.per_tile:
            raise ValueError(f"topv: InternVL image_seq_length {self.per_tile} is not a square grid")
        self.shuffle = round(1 / config.downsample_ratio)

    def segments(self, input_ids, inputs=None):
        out = []
        for b in range(input_ids.shape[0]):
            for run in runs((input_ids[b] == self.token_id).nonzero().flatten()):
                if run.numel() % self.per_tile:
                    raise ValueError(f"topv: row {b}: an image run of {run.numel()} tokens is not a multiple of "
                                     f"{self.per_tile} tokens per tile")
                out.append(Segment(b, run, tile_positions(self.q, run.numel() // self.per_tile)))
        return out

    def vision_tokens(self, x):
        q, g = self.q, self.shuffle
        x = x[:, x.shape[1] - (q * g) ** 2:]  # the encoder's CLS token comes first
        return x.reshape(x.shape[0], q, g, q, g, x.shape[-1]).mean((2, 4)).reshape(-1, x.shape[-1])

    def vision_rows(self, segments, calls):
        total = sum(seg.token_index.numel() for seg in segments)
        return torch.arange(total), total  # tiles in input order, each tile's tokens in order

    def vision_layer(self, model):
        layers = submodule(model, "model.vision_tower.encoder.layer", self.name)
        layer = layers[feature_layer(self.config.vision_feature_layer, len(layers), self.name)]
        return layer, submodule(layer, "layernorm_after", self.name)
