"""``python -m topv.demo``: TopV inside a tiny LLaVA-1.5-shaped model, no downloads.

Builds a random-initialised LLaVA (CLIP-style 24 x 24 patch grid, a small Llama), generates with
and without TopV, prints the tokens each layer sees, the KV-cache bytes and timings, and saves a
PNG of the synthetic input image with the patches TopV kept (pruned ones dimmed). The weights are
random, so the generated tokens mean nothing and the kept set shows the mechanics (budget,
uniform recovery, positions), not what a trained model would keep.
"""

from __future__ import annotations

import argparse
import struct
import time
import zlib

import torch

import topv
from topv.integrations import tiny_models as tm


def _synthetic_image(size: int) -> torch.Tensor:
    """A smooth colour gradient with a bright disc: (3, size, size) in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((x - 0.62) ** 2 + (y - 0.4) ** 2) < 0.04).float()
    return torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.5 - 0.3 * x]).clamp(0, 1) * (1 - disc) + disc


def _write_png(path: str, rgb: torch.Tensor) -> None:
    """Minimal PNG writer (8-bit RGB, zlib), for machines without matplotlib."""
    h, w, _ = rgb.shape
    data = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    raw = b"".join(b"\x00" + data[r].tobytes() for r in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def save_kept_png(path: str, image: torch.Tensor, kept_patches: torch.Tensor, side: int, keep_ratio: float) -> str:
    """Save ``image`` (3, H, W) with the patches not in ``kept_patches`` (indices into the
    side x side row-major grid) dimmed. Uses matplotlib when importable. Returns the writer used."""
    H = image.shape[-1]
    p = H // side
    mask = torch.zeros(side * side)
    mask[kept_patches.cpu()] = 1
    m = mask.view(side, side).repeat_interleave(p, 0).repeat_interleave(p, 1)
    shown = image * (0.25 + 0.75 * m)
    rgb = shown.permute(1, 2, 0)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_png(path, rgb.repeat_interleave(2, 0).repeat_interleave(2, 1))
        return "zlib"
    fig, ax = plt.subplots(1, 2, figsize=(8, 4.2))
    ax[0].imshow(image.permute(1, 2, 0).numpy())
    ax[0].set_title("input (synthetic)")
    ax[1].imshow(rgb.numpy())
    ax[1].set_title(f"kept by TopV: {int(mask.sum())}/{side * side} patches ({keep_ratio:.0%})")
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _cache_bytes(cache, n_layers):
    total = 0
    for layer in cache.layers[:n_layers]:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--layer", type=int, default=2, help="K: the layer whose input/output are scored")
    ap.add_argument("--kv", choices=["after_k", "all"], default="after_k")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--out", default="topv_demo.png", help="where to save the PNG of kept patches")
    ap.add_argument("--backend", default="auto", help="topv.prune backend")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    side, patch = 24, 14  # the LLaVA-1.5 grid: 336 px / 14 px = 24 x 24 = 576 image tokens
    cfg = tm.llava_config(text_layers=8, hidden=256, heads=8, kv_heads=4, inter=512, vocab=512,
                          image_size=side * patch, patch=patch, vision_hidden=64, attn=args.attn)
    model = tm.build(cfg, dtype=dtype, device=device, seed=0)
    inputs = tm.llava_inputs(cfg, [[12, "img", 40]], dtype=dtype, device=device, seed=0)
    image = _synthetic_image(side * patch)
    inputs["pixel_values"] = (image[None] * 2 - 1).to(device=device, dtype=dtype)  # one image, [-1, 1]
    n_layers = cfg.text_config.num_hidden_layers
    T = inputs["input_ids"].shape[1]
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  return_dict_in_generate=True)

    print(f"tiny LLaVA-1.5-shaped model, random weights: {n_layers} layers, hidden {cfg.text_config.hidden_size}, "
          f"{side}x{side} = {side * side} image tokens, prompt {T} tokens, device {device}, {dtype}, "
          f"attn {args.attn}, transformers {__import__('transformers').__version__}")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        base, t_base = _timed(lambda: model.generate(**inputs, **gen_kw), device)
        base_bytes = _cache_bytes(base.past_key_values if hasattr(base, "past_key_values") else base.cache, n_layers)
        with topv.enable(model, keep_ratio=args.keep_ratio, layer=args.layer, kv=args.kv, backend=args.backend) as s:
            s.sync_timing = True
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            pruned, t_topv = _timed(lambda: model.generate(**inputs, **gen_kw), device)
            info = s.last
    cache = pruned.past_key_values if hasattr(pruned, "past_key_values") else pruned.cache
    topv_bytes = _cache_bytes(cache, n_layers)
    K = args.layer
    print(f"\nTopV keep_ratio={args.keep_ratio} layer K={K} kv={args.kv}: image tokens kept "
          f"{info.keep_counts[0]}/{info.segments[0].token_index.numel()}")
    print(f"tokens each layer sees in the prefill: layers 0..{K}: {info.input_length}, "
          f"layers {K + 1}..{n_layers - 1}: {info.pruned_length}")
    print(f"KV-cache length per layer after prefill: {info.cache_lengths}")
    print(f"KV-cache bytes after {args.new_tokens} new tokens: unpruned {base_bytes / 1024:.1f} KiB, "
          f"TopV {topv_bytes / 1024:.1f} KiB ({topv_bytes / base_bytes:.0%})")
    print(f"generate ({args.new_tokens} new tokens): unpruned {t_base * 1e3:.1f} ms, TopV {t_topv * 1e3:.1f} ms; "
          f"scoring (gather + topv.prune) {info.prune_seconds * 1e3:.2f} ms")
    same = int((base.sequences[0, T:] == pruned.sequences[0, T:]).sum())
    print(f"greedy tokens equal to the unpruned run: {same}/{args.new_tokens} (random weights: no meaning)")
    start = int(info.segments[0].token_index[0])
    kept_patches = info.kept[0] - start
    writer = save_kept_png(args.out, image, kept_patches, side, args.keep_ratio)
    print(f"saved {args.out} ({writer}): pruned patches dimmed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
