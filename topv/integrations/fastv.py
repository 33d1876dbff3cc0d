"""FastV (Chen et al., ECCV 2024) as a baseline for the benchmarks, on the same hook machinery.

As published: image tokens are ranked by the attention the **last token** pays them in layer
K-1, averaged over heads; the top ``keep`` of each image are kept; layers K.. run on the kept
tokens (layers 0..K-1 on all). That needs the attention weights of layer K-1, so that one layer
runs eager attention (weights materialised), the others keep their implementation. Everything
else (positions, masks, KV modes, decoding) is shared with TopV, so a benchmark compares the
scorers and not two integrations.

``apply_fastv(model, keep_ratio=0.25, layer=2)`` -> session; :func:`topv.remove` undoes it.
"""

from __future__ import annotations

import copy

import torch

from topv.integrations import transformers as _hf


class FastVSession(_hf.TopVSession):
    def install(self):
        self._attn_row = None
        attn = self.layers[self.cfg.layer].self_attn
        self._saved_config = attn.config
        eager = copy.copy(attn.config)
        eager._attn_implementation = "eager"
        attn.config = eager  # this module only: its attention reads its own config
        super().install()
        self.handles.append(self.layers[self.cfg.layer].register_forward_pre_hook(self._float_mask, with_kwargs=True))
        self.handles.append(attn.register_forward_hook(self._capture_attention))

    def uninstall(self):
        super().uninstall()
        self.layers[self.cfg.layer].self_attn.config = self._saved_config

    def _float_mask(self, module, args, kwargs):
        # Eager attention adds the mask to the scores: give it an additive float mask where the
        # model's own implementation passes a boolean one or none (SDPA's is_causal fast path).
        mask = kwargs.get("attention_mask")
        hs = args[0] if args else kwargs["hidden_states"]
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            return None
        q = hs.shape[1]
        if mask is None:
            if q == 1:
                return None
            i = torch.arange(q, device=hs.device)
            mask = (i[None, :] <= i[:, None])[None, None]
        float_mask = torch.zeros(mask.shape, dtype=hs.dtype, device=hs.device)
        kwargs["attention_mask"] = float_mask.masked_fill_(~mask, torch.finfo(hs.dtype).min)
        return args, kwargs

    def _capture_attention(self, module, args, output):
        p = self._prefill
        if p is not None and not p.skip:
            weights = output[1]  # (B, H, q, kv)
            self._attn_row = weights[:, :, -1, :].float().mean(1)  # last token, mean over heads

    def score(self, p, segs, keeps):
        row = self._attn_row
        self._attn_row = None
        kept, off = [], 0
        for s, k in zip(segs, keeps):
            top = row[s.row, s.token_index].topk(k).indices.sort().values
            kept.append(top + off)
            off += s.token_index.numel()
        return torch.cat(kept)


def apply_fastv(model, *, keep_ratio=None, keep=None, layer=2, kv="after_k"):
    """FastV with FastV's K (``layer``, default 2): ranks by layer ``layer - 1``'s attention."""
    if layer < 1:
        raise ValueError(f"FastV's K must be >= 1 (it reads layer K-1's attention), got {layer}")
    return _hf.apply(model, keep_ratio=keep_ratio, keep=keep, layer=layer - 1, kv=kv, _session_cls=FastVSession)
