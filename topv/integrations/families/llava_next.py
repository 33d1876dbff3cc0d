"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, AnyRes): per image, the base view (s x s
tokens), then the unpadded high-resolution grid of H' rows, each of W' tokens followed by one
``image_newline`` token. Base view and grid are one segment in one image plane: base token (r, c)
sits at ((r+.5)/s, (c+.5)/s), grid token (r, c) at ((r+.5)/H', (c+.5)/W'). Newline tokens are not
scored and always kept.

H' and W' follow from ``image_sizes`` (the processor's output: what a serving engine holds). The
Hugging Face ``generate`` encodes the images before the prefill and passes no sizes; then the
layout is read off the embeddings themselves: ``image_newline_mask`` (B, T), True where a token's
embedding equals the learned ``image_newline`` vector, computed on the device and read with the
rest of the layout.

Vision stage: the CLIP encoder layer ``vision_feature_layer`` selects, run on every crop of every
image (the base view, then the nh x nw high-resolution crops). Base token j is patch j of the base
crop; grid token (r, c) is the patch at (r, c) of the crops tiled into an (nh*s) x (nw*s) grid,
shifted by the rows (or columns) that unpadding removed from each side. The crop arrangement
(nh, nw) follows from ``image_sizes`` and cannot be recovered from the unpadded grid (images of
one grid shape can have different crops), so the engine reads the sizes off the encoder's call."""

from __future__ import annotations

import torch

from topv.integrations.families.base import Family, grid
from topv.integrations.families.llava import clip_layer, clip_patches
from topv.integrations.records import Segment


class LlavaNext(Family):
    name = "LLaVA-NeXT"
    classes = "LlavaNextForConditionalGeneration"
    inputs = ("image_sizes", "image_newline_mask")
    encoder_inputs = ("image_sizes",)

    def __init__(self, config, image_newline=None):
        super().__init__(config)
        vc = config.vision_config
        self.token_id = config.image_token_id
        self.side = vc.image_size // vc.patch_size
        self.newline = image_newline

    def reads_embeds(self, inputs):
        return inputs.get("image_sizes") is None and inputs.get("image_newline_mask") is None

    def embed_inputs(self, embeds):
        if self.newline is None:
            raise ValueError("topv: reading LLaVA-NeXT's layout off the embeddings needs the image_newline vector")
        return {"image_newline_mask": (embeds == self.newline.to(embeds.dtype)).all(-1)}

    def crops(self, size) -> tuple[int, int]:
        """(nh, nw): the arrangement of the high-resolution crops of an image of ``size`` = (height, width) px."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        return get_anyres_image_grid_shape(list(size), self.config.image_grid_pinpoints,
                                           self.config.vision_config.image_size)

    def grid_shape(self, size) -> tuple[int, int]:
        """(H', W'): the unpadded high-resolution grid of an image of ``size`` = (height, width) px."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        nh, nw = self.crops(size)
        h, w = unpad_image(torch.empty(0, nh * self.side, nw * self.side), torch.tensor(list(size))).shape[1:]
        return h, w

    def segments(self, input_ids, inputs=None):
        inputs = inputs or {}
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            shapes = [self.grid_shape(s) for s in sizes.tolist()]
            return self._cut(input_ids, lambda b, i, where, k: shapes[k] if k < len(shapes) else None,
                             len(shapes))
        is_nl = inputs.get("image_newline_mask")
        if is_nl is None:
            raise ValueError("topv: LLaVA-NeXT's layout needs `image_sizes` or `image_newline_mask`")
        s2 = self.side * self.side

        def shape(b, i, where, k):
            nl = is_nl[b, where[i + s2:]].nonzero().flatten()
            if nl.numel() == 0:
                raise ValueError(f"topv: row {b}: image without newline tokens; not a LLaVA-NeXT layout")
            w = int(nl[0])  # tokens before the first newline: W'
            h = 0
            while w and i + s2 + (h + 1) * (w + 1) <= where.numel() and bool(is_nl[b, where[i + s2 + h * (w + 1) + w]]):
                h += 1
            return h, w

        return self._cut(input_ids, shape, None)

    def _cut(self, input_ids, shape_of, n_images):
        """Walk each row's image tokens image by image; ``shape_of(row, first, where, k)`` gives the
        (H', W') of the k-th image of the batch, whose tokens start at ``where[first]``."""
        s2 = self.side * self.side
        base = grid(self.side, self.side)
        out, k = [], 0
        for b in range(input_ids.shape[0]):
            where = (input_ids[b] == self.token_id).nonzero().flatten()
            i, n = 0, where.numel()
            while i < n:
                hw = shape_of(b, i, where, k)
                if hw is None:
                    raise ValueError(f"topv: `image_sizes` lists {n_images} images; input_ids hold more")
                h, w = hw
                need = s2 + h * (w + 1) if w else s2 + 1
                if i + need > n:
                    raise ValueError(f"topv: row {b}: image {k} needs {need} tokens ({self.side}x{self.side} base view "
                                     f"+ {h}x{w} grid with newlines); {n - i} image tokens are left")
                tok = where[i:i + need]
                if w:
                    body = tok[s2:].view(h, w + 1)
                    scored = torch.cat([tok[:s2], body[:, :w].reshape(-1)])
                    newlines = body[:, w].contiguous()
                    pos = torch.cat([base, grid(h, w)])
                else:  # a single-tile image: the base view and one newline
                    scored, newlines, pos = tok[:s2], tok[s2:], base
                out.append(Segment(b, scored, pos, "image", newlines))
                i += need
                k += 1
        if n_images is not None and k != n_images:
            raise ValueError(f"topv: `image_sizes` lists {n_images} images; input_ids hold {k}")
        return out

    def vision_tokens(self, x):
        return clip_patches(x, self.side)

    def vision_rows(self, segments, calls):
        sizes = [size for call in calls for size in call["image_sizes"].tolist()]
        if len(sizes) != len(segments):
            raise ValueError(f"topv: the vision encoder was given {len(sizes)} image sizes for {len(segments)} "
                             f"{self.name} images")
        s = self.side
        rows, crop = [], 0
        for k, (seg, size) in enumerate(zip(segments, sizes)):
            (nh, nw), (h, w) = self.crops(size), self.grid_shape(size)
            if seg.token_index.numel() != s * s + h * w:
                raise ValueError(f"topv: image {k} of size {size} has a {h}x{w} grid ({s * s + h * w} scored tokens); "
                                 f"its segment has {seg.token_index.numel()}")
            r = torch.arange(h)[:, None] + (nh * s - h) // 2  # unpadding removes the same count from each side
            c = torch.arange(w)[None, :] + (nw * s - w) // 2
            tile = crop + 1 + (r // s) * nw + c // s
            rows += [crop * s * s + torch.arange(s * s), (tile * s * s + (r % s) * s + c % s).reshape(-1)]
            crop += 1 + nh * nw
        return torch.cat(rows), crop * s * s

    def vision_layer(self, model):
        return clip_layer(model, self.config, self.name)
