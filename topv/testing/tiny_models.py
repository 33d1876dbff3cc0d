"""Random-initialised VLMs built in code (no downloads), shared by the tests, the demo and the
end-to-end benchmark (which asks for real-size shapes through the same builders).

Each ``*_config`` returns a config and :func:`build` an eval-mode model; each ``*_inputs`` returns
the keyword arguments of a prefill for prompts given as lists of pieces: an ``int`` n is n text
tokens, ``"img"`` one image (``("img", (h, w))`` for a Qwen image of h x w merged patches,
``("img", (height, width))`` pixels for LLaVA-NeXT, ``("img", tiles)`` for InternVL), ``("vid",
(t, h, w))`` a Qwen video.
"""

from __future__ import annotations

import inspect

import torch

TEXT_VOCAB = 96  # text tokens are drawn from [3, TEXT_VOCAB); special ids sit above it
PAD_ID = 0


def llava_config(*, text_layers=4, hidden=64, heads=4, kv_heads=2, inter=128, vocab=128, image_size=28, patch=4,
                 vision_hidden=32, vision_layers=1, vision_heads=2, vision_feature_layer=-1, attn="sdpa",
                 text_model="llama"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=vision_hidden,
                          intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                          num_attention_heads=vision_heads, projection_dim=vision_hidden)
    tc = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=text_layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                     max_position_embeddings=4096, pad_token_id=PAD_ID)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab - 1,
                      vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    return cfg


def qwen2_vl_config(*, text_layers=4, hidden=64, heads=4, kv_heads=2, inter=128, vocab=128, vision_depth=1,
                    vision_embed=32, vision_heads=2, patch=2, merge=2, attn="sdpa", version=2):
    if version == 2:
        from transformers import Qwen2VLConfig as C
    else:
        from transformers import Qwen2_5_VLConfig as C
    head_dim = hidden // heads
    # mrope sections sum to head_dim / 2
    t = head_dim // 2 - 2 * (head_dim // 6)
    section = [t, head_dim // 6, head_dim // 6]
    text = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=4096, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                               "rope_theta": 10000.0},
                pad_token_id=PAD_ID)
    vision = dict(depth=vision_depth, embed_dim=vision_embed, hidden_size=hidden, num_heads=vision_heads,
                  patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, in_channels=3)
    if version != 2:
        vision = dict(depth=vision_depth, hidden_size=vision_embed, out_hidden_size=hidden, num_heads=vision_heads,
                      intermediate_size=vision_embed * 2, patch_size=patch, spatial_merge_size=merge,
                      temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[0], window_size=patch * merge * 2)
    cfg = C(text_config=text, vision_config=vision, image_token_id=vocab - 1, video_token_id=vocab - 2,
            vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    cfg._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        getattr(cfg, sub)._attn_implementation = attn
    return cfg


def build(config, *, dtype=torch.float32, device="cpu", seed=0):
    """Random weights straight on ``device`` in ``dtype`` (never a float32 CPU copy first)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def _text(n, g):
    return torch.randint(3, TEXT_VOCAB, (n,), generator=g)


def _pad(rows, padding_side):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        ids[b, sl] = r
        mask[b, sl] = 1
    return ids, mask


def llava_inputs(config, prompts, *, padding_side="left", seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    rows, n_images = [], 0
    for pieces in prompts:
        parts = []
        for p in pieces:
            if p == "img":
                parts.append(torch.full((n_img,), config.image_token_id))
                n_images += 1
            else:
                parts.append(_text(p, g))
        rows.append(torch.cat(parts))
    ids, mask = _pad(rows, padding_side)
    pix = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g).to(dtype)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device)}


def qwen2_vl_inputs(config, prompts, *, padding_side="left", seed=0, dtype=torch.float32, device="cpu"):
    """Pieces: int (text), ("img", (h, w)) an image of h x w merged patches, ("vid", (t, h, w))."""
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    m, ps, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
    cdim = vc.in_channels * tp * ps * ps
    rows, tts, img_thw, vid_thw, img_pix, vid_pix = [], [], [], [], [], []
    for pieces in prompts:
        parts, types = [], []
        for p in pieces:
            if isinstance(p, int):
                parts.append(_text(p, g))
                types.append(torch.zeros(p, dtype=torch.long))
                continue
            kind, shape = p
            t, h, w = (1, *shape) if kind == "img" else shape
            n = t * h * w
            tok = config.image_token_id if kind == "img" else config.video_token_id
            parts += [torch.tensor([config.vision_start_token_id]), torch.full((n,), tok),
                      torch.tensor([config.vision_end_token_id])]
            types += [torch.zeros(1, dtype=torch.long), torch.full((n,), 1 if kind == "img" else 2),
                      torch.zeros(1, dtype=torch.long)]
            thw = [t, h * m, w * m]
            pix = torch.randn(t * h * m * w * m, cdim, generator=g)
            (img_thw if kind == "img" else vid_thw).append(thw)
            (img_pix if kind == "img" else vid_pix).append(pix)
        rows.append(torch.cat(parts))
        tts.append(torch.cat(types))
    ids, mask = _pad(rows, padding_side)
    tt, _ = _pad(tts, padding_side)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": tt}
    if img_thw:
        out["pixel_values"] = torch.cat(img_pix).to(dtype)
        out["image_grid_thw"] = torch.tensor(img_thw)
    if vid_thw:
        out["pixel_values_videos"] = torch.cat(vid_pix).to(dtype)
        out["video_grid_thw"] = torch.tensor(vid_thw)
    return {k: v.to(device) for k, v in out.items()}


def split_batch(config, inputs):
    """The per-row, unpadded prompts of a batch built by ``llava_inputs``/``qwen2_vl_inputs``,
    each with exactly its own images (batch 1 each)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    out = []
    if config.model_type in ("llava_next", "internvl"):
        first = 0
        for b in range(ids.shape[0]):
            row = ids[b][mask[b]]
            if config.model_type == "llava_next":
                # one image per image token run; adjacent images are counted from image_sizes
                n_tok, k, need = int((row == config.image_token_id).sum()), 0, 0
                while need < n_tok:
                    need += llava_next_tokens(config, inputs["image_sizes"][first + k].tolist())[0]
                    k += 1
                extra = {"image_sizes": inputs["image_sizes"][first:first + k]}
            else:
                k = int((row == config.image_token_id).sum()) // config.image_seq_length  # tiles
                extra = {}
            out.append({"input_ids": row[None], "attention_mask": torch.ones_like(row)[None],
                        "pixel_values": inputs["pixel_values"][first:first + k], **extra})
            first += k
        return out
    if config.model_type == "llava":
        vc = config.vision_config
        n_img = (vc.image_size // vc.patch_size) ** 2
        first = 0
        for b in range(ids.shape[0]):
            row = ids[b][mask[b]]
            k = int((row == config.image_token_id).sum()) // n_img
            out.append({"input_ids": row[None], "attention_mask": torch.ones_like(row)[None],
                        "pixel_values": inputs["pixel_values"][first:first + k]})
            first += k
        return out
    plan = {"image": ("image_grid_thw", "pixel_values", config.image_token_id),
            "video": ("video_grid_thw", "pixel_values_videos", config.video_token_id)}
    cursors = {kind: [0, 0] for kind in plan}  # (next grid row, next pixel row)
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        d = {"input_ids": row[None], "attention_mask": torch.ones_like(row)[None],
             "mm_token_type_ids": inputs["mm_token_type_ids"][b][mask[b]][None]}
        for kind, (gkey, pkey, tok) in plan.items():
            if gkey not in inputs:
                continue
            n_tok = int((row == tok).sum())
            merge2 = config.vision_config.spatial_merge_size ** 2
            gi, pi = cursors[kind]
            grids = []
            while n_tok > 0:
                t, h, w = inputs[gkey][gi].tolist()
                grids.append(inputs[gkey][gi])
                n_tok -= t * h * w // merge2
                gi += 1
            if grids:
                rows = sum(int(g.prod()) for g in grids)
                d[gkey] = torch.stack(grids)
                d[pkey] = inputs[pkey][pi:pi + rows]
                pi += rows
            cursors[kind] = [gi, pi]
        out.append(d)
    return out


def llava_next_config(*, text_layers=4, hidden=64, heads=4, kv_heads=2, inter=128, vocab=128, image_size=28, patch=4,
                      vision_hidden=32, attn="sdpa"):
    from transformers import LlavaNextConfig

    base = llava_config(text_layers=text_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, inter=inter,
                        vocab=vocab, image_size=image_size, patch=patch, vision_hidden=vision_hidden, attn=attn)
    s = image_size
    cfg = LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, image_token_id=vocab - 1,
                          image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]], vision_feature_layer=-1,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    return cfg


def llava_next_tokens(config, size):
    """Image tokens LLaVA-NeXT uses for an image of ``size`` = (height, width) pixels."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vc = config.vision_config
    s = vc.image_size // vc.patch_size
    nh, nw = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vc.image_size)
    h, w = unpad_image(torch.zeros(1, nh * s, nw * s), torch.tensor(size)).shape[1:]
    return s * s + h * (w + 1), nh * nw + 1


def llava_next_inputs(config, prompts, *, padding_side="left", seed=0, dtype=torch.float32, device="cpu"):
    """Pieces: int (text) or ("img", (height, width)) in pixels."""
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    rows, sizes, n_patches = [], [], []
    for pieces in prompts:
        parts = []
        for p in pieces:
            if isinstance(p, int):
                parts.append(_text(p, g))
                continue
            n_tok, n_p = llava_next_tokens(config, p[1])
            parts.append(torch.full((n_tok,), config.image_token_id))
            sizes.append(list(p[1]))
            n_patches.append(n_p)
        rows.append(torch.cat(parts))
    ids, mask = _pad(rows, padding_side)
    P = max(n_patches)
    pix = torch.randn(len(sizes), P, 3, vc.image_size, vc.image_size, generator=g).to(dtype)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device),
            "image_sizes": torch.tensor(sizes).to(device)}


def internvl_config(*, text_layers=4, hidden=64, heads=4, kv_heads=2, inter=128, vocab=128, image_size=32, patch=4,
                    vision_hidden=32, vision_layers=1, vision_feature_layer=-1, attn="sdpa"):
    from transformers import InternVLConfig

    q = image_size // patch // 2  # pixel shuffle with downsample_ratio 0.5
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                  num_attention_heads=2, image_size=[image_size, image_size], patch_size=[patch, patch])
    text = dict(model_type="qwen2", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=4096, pad_token_id=PAD_ID)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1, image_seq_length=q * q,
                         downsample_ratio=0.5, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    return cfg


def internvl_inputs(config, prompts, *, padding_side="left", seed=0, dtype=torch.float32, device="cpu"):
    """Pieces: int (text) or ("img", tiles): an image of ``tiles`` tiles (thumbnail included)."""
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    rows, n_tiles = [], 0
    for pieces in prompts:
        parts = []
        for p in pieces:
            if isinstance(p, int):
                parts.append(_text(p, g))
                continue
            parts += [torch.tensor([vocab_start(config)]), torch.full((config.image_seq_length * p[1],),
                                                                       config.image_token_id),
                      torch.tensor([vocab_start(config) + 1])]
            n_tiles += p[1]
        rows.append(torch.cat(parts))
    ids, mask = _pad(rows, padding_side)
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    pix = torch.randn(n_tiles, 3, size, size, generator=g).to(dtype)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "pixel_values": pix.to(device)}


def vocab_start(config):
    """Ids of InternVL's <img> and </img> in the tiny vocabulary (just below the image token)."""
    return config.image_token_id - 3


def cache_of(output):
    """The cache a forward or ``generate`` returned: ``cache`` in transformers 5.24, ``past_key_values``
    in 5.17 (read without the newer versions' deprecation notice)."""
    name = "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"
    return getattr(output, name, None)


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes a cache: ``cache`` (5.24) or ``past_key_values`` (5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
