"""End-to-end benchmark: TopV inside real-size VLM prefills vs the unpruned model and FastV.

    python bench/bench_e2e.py --out bench/results/e2e          # full: 7B-shaped models on one GPU
    python bench/bench_e2e.py --quick --device cpu --out /tmp/e2e   # smoke run with tiny models

A full run is 30 cases; at Hugging Face's eager decode speed on an H100 (about 70 ms per decode
step for a 7B model, measured) the 256-token decodes dominate and the whole run takes about 12
minutes: split it with ``--setups llava7b`` / ``--setups qwen2vl7b`` (or ``--methods``) to stay
under a 10-minute command limit.

Models have **random weights** built directly on the device in bf16 (``from_config`` under a
``torch.device`` context): speed and memory do not depend on the weights, only on the shapes.

* ``llava7b``: LLaVA-1.5-7B shape (CLIP ViT-L/14-336 + Llama-7B), one 336x336 image (576 visual
  tokens) and ~60 text tokens, batch 1 and batch 16.
* ``qwen2vl7b``: Qwen2-VL-7B shape, one 1344x1344 image (48 x 48 = 2304 visual tokens), batch 1.

Methods, each on the same model and inputs: ``unpruned`` (SDPA), ``topv-<keep>-<kv>`` (keep
50/25/12.5 %, kv after_k and all; K = 2), ``fastv-<keep>`` (FastV as published: K = 2, ranks by
layer 1's last-token attention, so layer 1 runs eager; kv after_k, which is FastV's behaviour).

Columns: TTFT (whole prefill incl. the vision tower, eager, median), decode tokens/s over
``--new-tokens`` forced new tokens (``generate(n)`` minus ``generate(1)``), peak memory during
``generate`` above what was allocated before it (weights and inputs), KV-cache bytes after the
prefill, the scoring step's share of TTFT (gather + scorer, device-synchronised run), and the
language model's prefill alone, eager and replayed from a CUDA graph (fixed image size and
budget; the image layout is fixed in advance and ``check_finite=False``, as capture needs). All runs use ``check_finite=False``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py: environment and versions of a run)

import topv  # noqa: E402
from topv.integrations import tiny_models as tm  # noqa: E402
from topv.integrations.fastv import apply_fastv  # noqa: E402
from topv.integrations.transformers import session_of  # noqa: E402

KEEPS = (0.5, 0.25, 0.125)


@dataclass
class Row:
    setup: str
    method: str
    batch: int
    visual_tokens: int
    prompt_tokens: int
    ttft_ms: float | None = None
    decode_tok_s: float | None = None
    peak_mib_generate: float | None = None
    kv_mib: float | None = None
    prune_share: float | None = None
    lm_prefill_eager_ms: float | None = None
    lm_prefill_graph_ms: float | None = None
    tokens_after_k: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def llava7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def qwen2vl7b_config():
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                pad_token_id=0)
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=4)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                        vision_start_token_id=151652, vision_end_token_id=151653)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    return cfg


def setups(quick: bool):
    """(name, config factory, input factory(config, batch, dtype, device), batches)."""
    if quick:
        return [
            ("llava-tiny", lambda: tm.llava_config(text_layers=4),
             lambda c, b, dt, dev: tm.llava_inputs(c, [[20, "img", 40]] * b, dtype=dt, device=dev), (1, 2)),
            ("qwen2vl-tiny", lambda: tm.qwen2_vl_config(text_layers=4),
             lambda c, b, dt, dev: tm.qwen2_vl_inputs(c, [[20, ("img", (6, 6)), 40]] * b, dtype=dt, device=dev),
             (1,)),
        ]
    return [
        ("llava7b", llava7b_config,
         lambda c, b, dt, dev: tm.llava_inputs(c, [[20, "img", 40]] * b, dtype=dt, device=dev, seed=0), (1, 16)),
        ("qwen2vl7b", qwen2vl7b_config,
         lambda c, b, dt, dev: tm.qwen2_vl_inputs(c, [[20, ("img", (48, 48)), 40]] * b, dtype=dt, device=dev),
         (1,)),
    ]


def methods():
    out = [("unpruned", None)]
    for r in KEEPS:
        for kv in ("after_k", "all"):
            out.append((f"topv-{r:g}-{kv}", ("topv", r, kv)))
    for r in KEEPS:
        out.append((f"fastv-{r:g}", ("fastv", r, "after_k")))
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps):
    times = []
    out = None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def cache_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def _cache_of(out):
    c = getattr(out, "past_key_values", None)
    return c if c is not None else getattr(out, "cache", None)


def install(model, spec):
    if spec is None:
        return None
    kind, r, kv = spec
    if kind == "topv":
        return topv.apply(model, keep_ratio=r, kv=kv, check_finite=False)
    return apply_fastv(model, keep_ratio=r, kv=kv)


def lm_inputs(model, inputs):
    """The kwargs the VLM hands its language model in a prefill (captured from one run)."""
    got = {}

    def pre(module, args, kwargs):
        got.update({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    h = model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        h.remove()
    return got


def lm_prefill_timings(model, inputs, session, device, reps):
    """Language model prefill only: eager and replayed from a CUDA graph (device only)."""
    lm = model.model.language_model
    kw = lm_inputs(model, inputs)
    if kw["attention_mask"] is not None and bool(kw["attention_mask"].all()):
        kw["attention_mask"] = None  # no padding: the mask is all ones (and None keeps capture sync-free)
    if session is not None:
        session.fixed_segments = session.family.segments(inputs["input_ids"], inputs, kw["inputs_embeds"])

    def run():
        return lm(**kw, use_cache=True)

    eager, _ = timed(run, device, reps)
    graph_ms, note = None, ""
    if device.type == "cuda":
        try:
            g = common.capture_graph(run)
            g.replay()
            t, _ = timed(g.replay, device, max(reps, 5))
            graph_ms = t * 1e3
            del g
        except Exception as e:  # noqa: BLE001 - reported in the row, the benchmark goes on
            note = f"graph: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if session is not None:
        session.fixed_segments = None
    return eager * 1e3, graph_ms, note


def run_case(name, model, inputs, method, spec, device, args):
    B, T = inputs["input_ids"].shape
    cfg = model.config
    ids = inputs["input_ids"]
    vis = int(((ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))).sum()) // B
    row = Row(name, method, B, vis, T)
    session = install(model, spec)
    try:
        with torch.inference_mode():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            for _ in range(args.warmup):
                prefill()
            ttft, out = timed(prefill, device, args.reps)
            row.ttft_ms = ttft * 1e3
            row.kv_mib = cache_bytes(_cache_of(out)) / 2**20
            del out
            if session is not None:
                row.tokens_after_k = session.last.pruned_length
                session.sync_timing = True
                t, _ = timed(prefill, device, args.reps)
                row.prune_share = session.last.prune_seconds / t
                session.sync_timing = False
            n = args.new_tokens

            def gen(k):
                return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False)

            # Decode rate: generate(n) minus generate(1) (which is the prefill inside generate),
            # so generate's own set-up cost cancels.
            one, _ = timed(lambda: gen(1), device, args.reps)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)  # weights, inputs, anything left alive
            total, _ = timed(lambda: gen(n), device, 1)
            if device.type == "cuda":
                row.peak_mib_generate = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            row.decode_tok_s = B * (n - 1) / (total - one) if total > one else None
            row.lm_prefill_eager_ms, row.lm_prefill_graph_ms, row.note = lm_prefill_timings(
                model, inputs, session, device, args.reps)
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        row.note = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        if session_of(model) is not None:
            topv.remove(model)
    return row


# ---------------------------------------------------------------------------------------------


def environment(device):
    env = common.environment()
    if device.type != "cuda":
        env["gpu"] = platform.processor() or "cpu"
    env["about"] = "random weights: speed and memory do not depend on the weights, only on the shapes"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, few tokens: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/e2e", help="path prefix: writes <out>.json and <out>.csv")
    ap.add_argument("--new-tokens", type=int, default=None, help="forced new tokens (default 256, quick 8)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--setups", default=None, help="comma-separated setup names to run (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated method names to run (default: all)")
    args = ap.parse_args(argv)
    args.new_tokens = args.new_tokens or (8 if args.quick else 256)
    args.reps = args.reps or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    print(f"# {env['gpu']} | torch {env['torch']} | transformers {env['transformers']} | {env['commit']}")
    print(f"# {env['about']}; dtype {dtype}; {args.new_tokens} forced new tokens; check_finite=False")
    rows = []
    wanted_setups = None if args.setups is None else set(args.setups.split(","))
    wanted_methods = None if args.methods is None else set(args.methods.split(","))
    for name, make_cfg, make_inputs, batches in setups(args.quick):
        if wanted_setups is not None and name not in wanted_setups:
            continue
        t0 = time.perf_counter()
        model = tm.build(make_cfg(), dtype=dtype, device=device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"# {name}: {weights / 2**30:.2f} GiB of weights built in {time.perf_counter() - t0:.1f} s")
        for B in batches:
            inputs = make_inputs(model.config, B, dtype, device)
            for method, spec in methods():
                if wanted_methods is not None and method not in wanted_methods:
                    continue
                row = run_case(f"{name}-b{B}", model, inputs, method, spec, device, args)
                rows.append(row)
                print(fmt(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(table(rows))
    write(args.out, env, rows)
    return 0 if not any(r.note.startswith("FAILED") for r in rows) else 1


HEAD = ("setup", "method", "ttft_ms", "decode_tok_s", "peakMiB+", "kv_MiB", "prune%", "lm_eager", "lm_graph",
        "tok>K")


def fmt(r: Row) -> str:
    def f(v, p=1):
        return "-" if v is None else f"{v:.{p}f}"

    cells = (r.setup, r.method, f(r.ttft_ms, 2), f(r.decode_tok_s, 1), f(r.peak_mib_generate, 0),
             f(r.kv_mib, 1), f(None if r.prune_share is None else 100 * r.prune_share, 1),
             f(r.lm_prefill_eager_ms, 2), f(r.lm_prefill_graph_ms, 2),
             "-" if r.tokens_after_k is None else str(r.tokens_after_k))
    line = " | ".join(f"{c:>{max(len(h), 8)}}" if i > 1 else f"{c:<18}" for i, (c, h) in enumerate(zip(cells, HEAD)))
    return line + (f"  [{r.note}]" if r.note else "")


def table(rows):
    head = " | ".join(f"{h:>{max(len(h), 8)}}" if i > 1 else f"{h:<18}" for i, h in enumerate(HEAD))
    return "\n".join([head, "-" * len(head)] + [fmt(r) for r in rows])


def write(prefix, env, rows):
    if prefix.endswith((".json", ".csv")):
        prefix = os.path.splitext(prefix)[0]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    fields = [k for k in asdict(rows[0]) if k != "extra"] + list(env) if rows else []
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            d = {k: v for k, v in asdict(r).items() if k != "extra"}
            w.writerow({**d, **env})
    print(f"wrote {prefix}.json and {prefix}.csv")


if __name__ == "__main__":
    raise SystemExit(main())
