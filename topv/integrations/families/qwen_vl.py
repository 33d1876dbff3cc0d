"""Qwen2-VL and Qwen2.5-VL: image i is ``t*(h/m)*(w/m)`` merged patches (``image_grid_thw``, m the
spatial merge size), t-major then row-major, one run of tokens between the vision start and end
tokens; videos likewise (``video_grid_thw``). A video is one segment whose frames lie in one image
plane: every frame gets the same grid positions and the frames share one budget.

``generate`` (transformers 5.24) encodes the images before the prefill and passes no grid; the
layout is then read off the model's own M-RoPE ``position_ids``, whose h and w axes count an
image's rows and columns."""

from __future__ import annotations

import torch

from topv.integrations.families.base import Family, grid, runs
from topv.integrations.records import Segment


class QwenVL(Family):
    name = "Qwen2-VL / Qwen2.5-VL"
    classes = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"
    inputs = ("image_grid_thw", "video_grid_thw", "position_ids")

    def __init__(self, config, image_newline=None):
        super().__init__(config)
        self.merge = config.vision_config.spatial_merge_size
        self.kinds = ((config.image_token_id, "image_grid_thw", "image"),
                      (config.video_token_id, "video_grid_thw", "video"))

    def segments(self, input_ids, inputs=None):
        inputs = inputs or {}
        pos = inputs.get("position_ids")
        pos = pos[-3:] if pos is not None and pos.dim() == 3 else None  # (4, B, T): text positions first
        out = []
        for token_id, key, kind in self.kinds:
            thw = inputs.get(key)
            grids = None if thw is None else [(t, h // self.merge, w // self.merge) for t, h, w in thw.tolist()]
            j = 0
            for b in range(input_ids.shape[0]):
                for run in runs((input_ids[b] == token_id).nonzero().flatten()):
                    if grids is None:
                        if pos is None:
                            raise ValueError(f"topv: input_ids hold {kind} tokens but neither `{key}` nor 3-D "
                                             "position_ids were passed, so their layout is unknown")
                        out.append(Segment(b, run, self._from_positions(pos[1:, b, run]), kind))
                        j += 1
                        continue
                    # Images of one run (none in practice: each is wrapped) are cut by their grids.
                    start = 0
                    while start < run.numel():
                        if j >= len(grids):
                            raise ValueError(f"topv: `{key}` lists {len(grids)} {kind}s; input_ids hold more")
                        t, gh, gw = grids[j]
                        n = t * gh * gw
                        if start + n > run.numel():
                            raise ValueError(f"topv: {kind} {j} needs {n} tokens ({t}x{gh}x{gw} by `{key}`); "
                                             f"its run in row {b} has {run.numel() - start}")
                        p = grid(gh, gw)
                        out.append(Segment(b, run[start:start + n], p.repeat(t, 1) if t > 1 else p, kind))
                        start += n
                        j += 1
            if grids is not None and j != len(grids):
                raise ValueError(f"topv: `{key}` lists {len(grids)} {kind}s; input_ids hold {j}")
        out.sort(key=lambda s: (s.row, int(s.token_index[0])))
        return out

    @staticmethod
    def _from_positions(hw: torch.Tensor) -> torch.Tensor:
        """(2, n) M-RoPE h and w positions of one image or video -> (n, 2) plane positions."""
        hw = hw.to(torch.float32)
        hw = hw - hw.min(dim=1, keepdim=True).values
        size = hw.max(dim=1, keepdim=True).values + 1
        return ((hw + 0.5) / size).T.contiguous()

    def decode_positions(self, model, start, batch, q, device):
        deltas = getattr(model.model, "rope_deltas", None)
        if deltas is None:
            return None
        pos = torch.arange(start, start + q, device=device).view(1, 1, q).expand(3, batch, q)
        return pos + deltas.to(device).view(1, -1, 1)
