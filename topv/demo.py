"""``python -m topv.demo``: TopV inside a tiny LLaVA-1.5-shaped model, no downloads.

Builds a random-initialised LLaVA (CLIP-style 24 x 24 patch grid, a small Llama), generates with
and without pruning (after decoder layer K, or with ``--stage vision`` before the language model,
scored in the vision encoder), prints the tokens each layer sees, the KV-cache bytes and timings, and saves
a picture of the synthetic input image with the patches that were kept: for TopV the top-scored
ones and the uniform recovery ones framed in two colours, pruned ones dimmed, with a title and a
legend (drawn by matplotlib when it is installed, by a built-in writer otherwise). The weights are
random, so the generated tokens mean nothing and the kept set shows the mechanics (budget,
recovery, positions), not what a trained model would keep.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import time
import zlib

import torch

import topv
from topv import defaults as D

SIDE, PATCH, LAYERS = 24, 14, 8  # the LLaVA-1.5 grid: 336 px / 14 px = 24 x 24 = 576 image tokens
TOP, RECOVERY, KEPT = (0.10, 0.85, 0.25), (1.00, 0.55, 0.05), (0.10, 0.85, 0.25)


def _synthetic_image(size: int) -> torch.Tensor:
    """A smooth colour gradient with a bright disc: (3, size, size) in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((x - 0.62) ** 2 + (y - 0.4) ** 2) < 0.04).float()
    return torch.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.5 - 0.3 * x]).clamp(0, 1) * (1 - disc) + disc


# ---- the picture --------------------------------------------------------------------------


def split_kept(info, recover_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, recovery) kept token indices of the first image: for TopV the recovery tokens are
    the kept ones outside the ``k - floor(recover_ratio * k)`` best scores (docs/algorithm.md);
    other methods have no recovery set."""
    kept = info.kept[0].cpu()
    if info.method != "topv" or info.scores is None or not info.pruned:
        return kept, kept[:0]
    k = kept.numel()
    k_top = k - math.floor(recover_ratio * k)
    tokens = info.segments[0].token_index
    scores = info.scores[0].float().cpu()
    order = torch.sort(torch.nan_to_num(scores, nan=-math.inf), descending=True, stable=True).indices[:k_top]
    top = tokens[order].sort().values
    return top, kept[~torch.isin(kept, top)]


def marked_image(image: torch.Tensor, top: torch.Tensor, recovery: torch.Tensor, side: int) -> torch.Tensor:
    """(H, W, 3): pruned patches dimmed, top patches framed in one colour, recovery in another."""
    H = image.shape[-1]
    p = H // side
    state = torch.zeros(side * side, dtype=torch.long)  # 0 pruned, 1 top, 2 recovery
    state[top] = 1
    state[recovery] = 2
    cell = state.view(side, side).repeat_interleave(p, 0).repeat_interleave(p, 1)
    rgb = image.permute(1, 2, 0).clone()
    rgb[cell == 0] = rgb[cell == 0] * 0.25 + 0.1
    r = torch.arange(H) % p
    edge = ((r == 0) | (r == p - 1))[:, None] | ((r == 0) | (r == p - 1))[None, :]
    for s, colour in ((1, TOP), (2, RECOVERY)):
        rgb[(cell == s) & edge] = torch.tensor(colour)
    return rgb


def save_picture(path: str, image: torch.Tensor, top: torch.Tensor, recovery: torch.Tensor, side: int,
                 title: str) -> str:
    """Save the marked picture with ``title`` and a legend; returns the writer used."""
    rgb = marked_image(image, top, recovery, side)
    legend = [("top score", TOP), ("recovery", RECOVERY), ("pruned", (0.3, 0.3, 0.3))] if recovery.numel() else \
        [("kept", KEPT), ("pruned", (0.3, 0.3, 0.3))]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        _write_png(path, _with_text(rgb.repeat_interleave(2, 0).repeat_interleave(2, 1), title, legend))
        return "built-in PNG writer"
    fig, ax = plt.subplots(1, 2, figsize=(9, 5.2))
    ax[0].imshow(image.permute(1, 2, 0).numpy())
    ax[0].set_title("input (synthetic)")
    ax[1].imshow(rgb.numpy())
    ax[1].set_title("image tokens kept (framed) and pruned (dimmed)")
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.legend(handles=[Patch(facecolor=c, label=n) for n, c in legend], loc="lower center", ncol=len(legend))
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


# A 3 x 5 bitmap font for the built-in writer: upper case, digits and a few signs.
_GLYPHS = {  # each glyph: five rows of three pixels, '#' set
    "A": ".#. #.# ### #.# #.#",
    "B": "##. #.# ##. #.# ##.",
    "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###",
    "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##",
    "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.",
    "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#",
    "N": "##. #.# #.# #.# #.#",
    "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..",
    "Q": ".#. #.# #.# ##. .##",
    "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.",
    "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# .#. .#.",
    "W": "#.# #.# ### ### #.#",
    "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.",
    "Z": "### ..# .#. #.. ###",
    "0": "### #.# #.# #.# ###",
    "1": ".#. ##. .#. .#. ###",
    "2": "##. ..# .#. #.. ###",
    "3": "##. ..# .#. ..# ##.",
    "4": "#.# #.# ### ..# ..#",
    "5": "### #.. ##. ..# ##.",
    "6": ".## #.. ### #.# ###",
    "7": "### ..# .#. .#. .#.",
    "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ##.",
    "%": "#.. ..# .#. #.. ..#",
    "/": "..# ..# .#. #.. #..",
    "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.",
    ".": "... ... ... ... .#.",
    ":": "... .#. ... .#. ...",
    "-": "... ... ### ... ...",
    "=": "... ### ... ### ...",
    ",": "... ... ... .#. #..",
    "+": "... .#. ### .#. ...",
    " ": "... ... ... ... ...",
}


def _with_text(rgb: torch.Tensor, title: str, legend) -> torch.Tensor:
    """``rgb`` (H, W, 3) with a title band above and a legend band below, in the 3 x 5 font."""
    scale, band = 3, 36
    W = rgb.shape[1]
    top = torch.ones(band, W, 3)
    bottom = torch.ones(band, W, 3)
    _text(top, title.upper(), 8, 10, scale)
    x = 8
    for name, colour in legend:
        bottom[10:10 + 5 * scale, x:x + 5 * scale] = torch.tensor(colour)
        x = _text(bottom, name.upper(), x + 6 * scale, 10, scale) + 6 * scale
    return torch.cat([top, rgb, bottom])


def _text(canvas: torch.Tensor, text: str, x: int, y: int, scale: int) -> int:
    for ch in text:
        glyph = _GLYPHS.get(ch, _GLYPHS[" "]).replace(" ", "")
        for i, bit in enumerate(glyph):
            if bit == "#":
                r, c = divmod(i, 3)
                canvas[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = 0.0
        x += 4 * scale
        if x + 4 * scale > canvas.shape[1]:
            break
    return x


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


# ---- the run ------------------------------------------------------------------------------


def _cache_bytes(cache) -> int:
    return sum(x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size()
               for x in cache.layers)


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def parse(argv=None) -> argparse.Namespace:
    """The arguments, every one checked before any model is built."""
    from topv.integrations.scorers import METHODS
    from topv.ops import resolve_backend

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="share of each image's tokens kept, in (0, 1]")
    ap.add_argument("--method", default="topv", choices=list(METHODS))
    ap.add_argument("--stage", choices=["layer", "vision"], default="layer",
                    help="prune after decoder layer K (the paper's placement) or before the language model")
    ap.add_argument("--layer", type=int, default=None,
                    help=f"stage layer: K, the last layer that sees every token (default {D.LAYER})")
    ap.add_argument("--kv", choices=["after_k", "all"], default=None, help="stage layer: the KV mode (default after_k)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--out", default="topv_demo.png", help="where to save the picture of the kept patches")
    ap.add_argument("--backend", default="auto", help="topv.prune backend (method topv)")
    args = ap.parse_args(argv)
    if not 0.0 < args.keep_ratio <= 1.0:
        ap.error(f"--keep-ratio must lie in (0, 1], got {args.keep_ratio}")
    if args.stage == "vision":
        if args.method == "fastv":
            ap.error("--method fastv reads the language model's attention; --stage vision prunes before it runs")
        for flag, value in (("--layer", args.layer), ("--kv", args.kv)):
            if value is not None:
                ap.error(f"{flag} configures --stage layer; --stage vision scores the vision encoder")
    else:
        args.layer = D.LAYER if args.layer is None else args.layer
        args.kv = args.kv or "after_k"
        lo = 1 if args.method == "fastv" else 0
        if not lo <= args.layer <= LAYERS - 2:
            ap.error(f"--layer must lie in [{lo}, {LAYERS - 2}] for the demo's {LAYERS}-layer model, got {args.layer}")
    if args.new_tokens < 1:
        ap.error(f"--new-tokens must be >= 1, got {args.new_tokens}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    if args.method != "topv" and args.backend != "auto":
        ap.error(f"--backend configures method topv; got --method {args.method}")
    try:
        resolve_backend(args.backend, device)
    except ValueError as e:
        ap.error(f"--backend: {e}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        ap.error(f"--out: the folder {folder} does not exist or is not writable")
    args.device = device
    return args


def main(argv=None):
    args = parse(argv)
    from topv.testing import tiny_models as tm

    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = tm.llava_config(text_layers=LAYERS, hidden=256, heads=8, kv_heads=4, inter=512, vocab=512,
                          image_size=SIDE * PATCH, patch=PATCH, vision_hidden=64, attn=args.attn)
    model = tm.build(cfg, dtype=dtype, device=device, seed=0)
    inputs = tm.llava_inputs(cfg, [[12, "img", 40]], dtype=dtype, device=device, seed=0)
    image = _synthetic_image(SIDE * PATCH)
    inputs["pixel_values"] = (image[None] * 2 - 1).to(device=device, dtype=dtype)  # one image, [-1, 1]
    T = inputs["input_ids"].shape[1]
    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  return_dict_in_generate=True)
    prune_kw = {"backend": args.backend} if args.method == "topv" else {}
    if args.stage == "vision":
        prune_kw["stage"] = "vision"
    else:
        prune_kw.update(layer=args.layer, kv=args.kv)

    print(f"tiny LLaVA-1.5-shaped model, random weights: {LAYERS} layers, hidden {cfg.text_config.hidden_size}, "
          f"{SIDE}x{SIDE} = {SIDE * SIDE} image tokens, prompt {T} tokens, device {device}, {dtype}, "
          f"attn {args.attn}, transformers {__import__('transformers').__version__}")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        base, t_base = _timed(lambda: model.generate(**inputs, **gen_kw), device)
        base_bytes = _cache_bytes(tm.cache_of(base))
        with topv.enable(model, keep_ratio=args.keep_ratio, method=args.method, **prune_kw) as s:
            s.sync_timing = True
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            pruned, t_pruned = _timed(lambda: model.generate(**inputs, **gen_kw), device)
            info, K = s.last, s.settings.layer
    pruned_bytes = _cache_bytes(tm.cache_of(pruned))
    n = info.segments[0].token_index.numel()
    where = "stage=vision" if args.stage == "vision" else f"kv={args.kv}"
    print(f"\n{args.method} keep_ratio={args.keep_ratio} {where}: image tokens kept {info.keep_counts[0]}/{n}"
          + ("" if info.pruned else " (nothing pruned: the forward ran untouched)"))
    if K < 0:
        print(f"tokens each layer sees in the prefill: every layer (0..{LAYERS - 1}): {info.pruned_length} of "
              f"{info.input_length} (pruned before the language model, scored in the vision encoder)")
    else:
        print(f"tokens each layer sees in the prefill: layers 0..{K}: {info.input_length}, "
              f"layers {K + 1}..{LAYERS - 1}: {info.pruned_length}")
    print(f"KV-cache length per layer after prefill: {info.cache_lengths}")
    print(f"KV-cache bytes after {args.new_tokens} new tokens: unpruned {base_bytes / 1024:.1f} KiB, "
          f"pruned {pruned_bytes / 1024:.1f} KiB ({pruned_bytes / base_bytes:.0%})")
    scoring = "" if info.score_seconds is None else f"; scoring {info.score_seconds * 1e3:.2f} ms"
    print(f"generate ({args.new_tokens} new tokens): unpruned {t_base * 1e3:.1f} ms, pruned {t_pruned * 1e3:.1f} ms; "
          f"pruning step {info.host_seconds * 1e3:.2f} ms host{scoring}")
    same = int((base.sequences[0, T:] == pruned.sequences[0, T:]).sum())
    print(f"greedy tokens equal to the unpruned run: {same}/{args.new_tokens} (random weights: no meaning)")
    start = int(info.segments[0].token_index[0])
    top, recovery = split_kept(info, D.RECOVER_RATIO)
    k = info.keep_counts[0]
    title = f"{args.method}{' (vision stage)' if K < 0 else ''} keeps {k}/{n} tokens ({k / n:.0%})" + (
        f": {top.numel()} top + {recovery.numel()} recovery" if recovery.numel() else "")
    writer = save_picture(args.out, image, top - start, recovery - start, SIDE, title)
    print(f"saved {args.out} ({writer}): " + ("top-scored and recovery patches framed in two colours, " if
                                              recovery.numel() else "kept patches framed, ") + "pruned ones dimmed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
