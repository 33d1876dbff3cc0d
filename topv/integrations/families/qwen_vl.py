"""Qwen2-VL and Qwen2.5-VL: image i is ``t*(h/m)*(w/m)`` merged patches (``image_grid_thw``, m the
spatial merge size), t-major then row-major, one run of tokens between the vision start and end
tokens; videos likewise (``video_grid_thw``). A video is one segment whose frames lie in one image
plane: every frame gets the same grid positions and the frames share one budget.

``generate`` (transformers 5.24) encodes the images before the prefill and passes no grid; the
layout is then read off the model's own M-RoPE ``position_ids``, whose h and w axes count an
image's rows and columns.

Vision stage: the encoder's last block (the merger reads its output), on the packed patches of
every image (one encoder call), then of every video (another); each run of m*m consecutive patches
becomes one language-model token, scored by the run's mean. Qwen2.5-VL's blocks hold the runs in
window order (each frame cut into windows of ``window_size`` pixels, row-major, and row-major
within a window); the rows table undoes it."""

from __future__ import annotations

import torch

from topv.integrations.families.base import Family, grid, runs, submodule
from topv.integrations.records import Segment
from topv.serving import group_mean


def window_order(grids: list[tuple[int, int, int]], window: int) -> torch.Tensor:
    """Qwen2.5-VL's window order of the merged tokens of one encoder call: entry p is the
    (natural, packed) index of the token at position p. ``grids`` are the items' (t, h, w) in
    merged tokens, ``window`` the window side in merged tokens."""
    out, base = [], 0
    for t, h, w in grids:
        H, W = -(-h // window) * window, -(-w // window) * window
        index = torch.full((t, H, W), -1)
        index[:, :h, :w] = torch.arange(t * h * w).view(t, h, w) + base
        index = index.view(t, H // window, window, W // window, window).transpose(2, 3).reshape(-1)
        out.append(index[index >= 0])
        base += t * h * w
    return torch.cat(out)


class QwenVL(Family):
    name = "Qwen2-VL / Qwen2.5-VL"
    classes = "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration"
    inputs = ("image_grid_thw", "video_grid_thw", "position_ids")
    rope_axes = 3

    def __init__(self, config, image_newline=None):
        super().__init__(config)
        vc = config.vision_config
        self.merge = vc.spatial_merge_size
        self.kinds = ((config.image_token_id, "image_grid_thw", "image"),
                      (config.video_token_id, "video_grid_thw", "video"))
        # Qwen2.5-VL's blocks attend within windows of window_size pixels, its tokens held in window order.
        self.window = vc.window_size // self.merge // vc.patch_size if config.model_type == "qwen2_5_vl" else None

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
                        plane, shape = self._from_positions(pos[:, b, run])
                        out.append(Segment(b, run, plane, kind, grid=shape))
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
                        out.append(Segment(b, run[start:start + n], p.repeat(t, 1) if t > 1 else p, kind,
                                           grid=(t, gh, gw)))
                        start += n
                        j += 1
            if grids is not None and j != len(grids):
                raise ValueError(f"topv: `{key}` lists {len(grids)} {kind}s; input_ids hold {j}")
        out.sort(key=lambda s: (s.row, int(s.token_index[0])))
        return out

    @staticmethod
    def _from_positions(thw: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(3, n) M-RoPE positions of one image or video -> (n, 2) plane positions and its (t, h, w)."""
        hw = thw[1:].to(torch.float32)
        hw = hw - hw.min(dim=1, keepdim=True).values
        size = hw.max(dim=1, keepdim=True).values + 1
        h, w = (int(v) for v in size.flatten().tolist())
        return ((hw + 0.5) / size).T.contiguous(), (thw.shape[1] // (h * w), h, w)

    def vision_tokens(self, x):
        return group_mean(x, self.merge * self.merge)

    def vision_rows(self, segments, calls):
        rows, offset = {}, 0
        for kind in ("image", "video"):  # the model encodes every image in one call, then every video
            mine = [i for i, seg in enumerate(segments) if seg.kind == kind]
            lengths = [segments[i].token_index.numel() for i in mine]
            at = torch.arange(sum(lengths))  # a token's row in its call, from its natural (packed) index
            if self.window is not None and mine:
                at[window_order([segments[i].grid for i in mine], self.window)] = torch.arange(sum(lengths))
            rows.update(zip(mine, torch.split(at + offset, lengths)))
            offset += sum(lengths)
        return torch.cat([rows[i] for i in range(len(segments))]), offset

    def vision_layer(self, model):
        blocks = submodule(model, "model.visual.blocks", self.name)
        return blocks[-1], submodule(blocks[-1], "norm2", self.name)

    def decode_positions(self, model, start, batch, q, device):
        deltas = getattr(model.model, "rope_deltas", None)
        if deltas is None:
            return None
        pos = torch.arange(start, start + q, device=device).view(1, 1, q).expand(3, batch, q)
        return pos + deltas.to(device).view(1, -1, 1)
