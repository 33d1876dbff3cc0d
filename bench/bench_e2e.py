"""End-to-end benchmark: every pruning method inside real-size VLM prefills and decodes, one run.

    python bench/bench_e2e.py                                        # 7B shapes on one GPU, prints only
    python bench/bench_e2e.py --setups llava15-7b --out bench/results # ... and appends to bench/results/<device>/e2e.csv
    python bench/bench_e2e.py --keep 0.5,0.25,0.125                  # every method at three keep ratios
    python bench/bench_e2e.py --quick --device cpu                   # tiny models: a smoke run (well under a minute)

Models have **random bf16 weights** built from configs in code (no downloads): speed and memory
depend on the shapes, not the weights. Setups: LLaVA-1.5-7B (one 336 px image, 576 visual tokens,
~640-token prompt; B = 1, 8, 16), LLaVA-NeXT-7B (one 672 px image: 2880 scored visual tokens plus
48 newlines), Qwen2-VL-7B with a 1344 px image (2304 visual tokens) and with a video of 16 x 24 x
24 = 9216 visual tokens. Methods, on the same model, inputs and budgets (one row per keep ratio of
``--keep``): ``unpruned``, ``topv/after_k``, ``topv/all`` (the layer stage, both KV modes),
``topv/vision`` (the vision stage: pruned before the language model), ``fastv``, ``random``,
``uniform``, ``dart`` (``--methods``; any method but fastv also as ``<method>/vision``, any as
``<method>/after_k`` or ``<method>/all``).

How each figure is measured (``check_finite=False`` throughout):

* TTFT: one whole prefill (vision tower included, ``logits_to_keep=1``), device-synchronised;
  median over ``--rounds``.
* decode ms/token: after a prefill, ``--decode-steps`` single-token steps by hand (no ``generate``:
  its per-step bookkeeping is the same for every method and only adds spread), each step
  device-synchronised and timed alone; median and 10th/90th percentiles over all steps of all
  rounds. hooks us: the host time the integration's hooks add to one decode step (median over
  rounds of ``session.decode_host_seconds / decode_steps``). Rounds interleave the methods (round r runs every method once), after one warm-up run
  of each, so that every method sees the same warm state and the same drift of the machine.
  Decode steps are not replayed from CUDA graphs (a pruned cache is a dynamic cache).
* step host ms: the host time of everything pruning adds to a prefill (layout, capture, the
  scorer's call, gather, masks, positions; ``PrefillInfo.host_seconds``), median of ``--rounds``
  prefills. step device ms: the device time of the kernels launched inside the step, from the
  profiler (CUDA only; the vision stage's capture in the encoder included). syncs: host
  synchronisations caused by the integration inside the language model's and the vision
  encoder's forward (``topv.testing.syncs``, any device); on CUDA also every
  synchronising CUDA call in that window (profiler), the model's own included.
* SDPA: the attention kernels the profiler saw in one prefill and one decode step (cudnn /
  flash / efficient / math; eager where weights are materialised), per row.
* peak MiB: device memory above what was allocated before a prefill + decode (CUDA only);
  KV MiB: the cache after the prefill. lm graph ms: the language model's prefill alone replayed
  from a CUDA graph (the layout pinned, CUDA only; not for the vision stage, whose prefill reads
  what the vision encoder produced outside the language model).
* tok>K: the tokens of the pruned layers (the vision stage: every layer).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py: environment and versions of a run)

import topv  # noqa: E402
from topv.testing import tiny_models as tm  # noqa: E402
from topv.testing.syncs import SyncCounter  # noqa: E402

METHODS = ("unpruned", "topv/after_k", "topv/all", "topv/vision", "fastv", "random", "uniform", "dart")
VARIANTS = ("after_k", "all", "vision")  # <method>/<variant>: the layer stage's KV mode, or the vision stage


def method_error(method: str) -> str | None:
    """Why ``method`` is not a benchmark method (None when it is)."""
    from topv.integrations.scorers import METHODS as SCORERS

    name, _, variant = method.partition("/")
    if method == "unpruned" or (name in SCORERS and variant in ("", *VARIANTS)
                                and not (name == "fastv" and variant == "vision")):
        return None
    return (f"unknown method {method!r}: give unpruned or <method>[/<variant>] with <method> in {list(SCORERS)} and "
            f"<variant> in {list(VARIANTS)} (fastv has no vision stage)")


@dataclass
class Row:
    setup: str
    batch: int
    visual_tokens: int
    prompt_tokens: int
    method: str
    keep_ratio: float | None
    attn: str
    ttft_ms: float | None = None
    decode_ms: float | None = None
    decode_p10_ms: float | None = None
    decode_p90_ms: float | None = None
    decode_hooks_us: float | None = None
    peak_mib: float | None = None
    kv_mib: float | None = None
    step_host_ms: float | None = None
    step_device_ms: float | None = None
    syncs: int | None = None
    cuda_syncs: int | None = None
    sdpa_prefill: str = ""
    sdpa_decode: str = ""
    lm_graph_ms: float | None = None
    tokens_after_k: int | None = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Models and inputs (random weights from configs in code)
# ---------------------------------------------------------------------------------------------


def llava15_7b(attn):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    return _attn(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu"), attn)


def llava_next_7b(attn):
    from transformers import LlavaNextConfig

    base = llava15_7b(attn)
    pin = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return _attn(LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config, image_token_id=32000,
                                 image_grid_pinpoints=pin, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default", projector_hidden_act="gelu"), attn)


def qwen2vl_7b(attn):
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                pad_token_id=0)
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=4)
    return _attn(Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                               video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653), attn)


def _attn(cfg, attn):
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None:
            c._attn_implementation = attn
    return cfg


@dataclass(frozen=True)
class Setup:
    name: str
    config: object  # attn -> config
    prompt: list  # one row's pieces (tiny_models' prompt format)
    inputs: object  # tiny_models.*_inputs
    batches: tuple


def setups(quick: bool) -> list[Setup]:
    if quick:
        return [
            Setup("llava-tiny", lambda a: tm.llava_config(text_layers=4, image_size=84, patch=14, attn=a),
                  [20, "img", 40], tm.llava_inputs, (1, 2)),
            Setup("llava-next-tiny", lambda a: tm.llava_next_config(attn=a), [3, ("img", (28, 56)), 4],
                  tm.llava_next_inputs, (1,)),
            Setup("qwen2vl-tiny-video", lambda a: tm.qwen2_vl_config(text_layers=4, attn=a),
                  [5, ("vid", (2, 4, 4)), 9], tm.qwen2_vl_inputs, (1,)),
        ]
    return [
        Setup("llava15-7b", llava15_7b, [20, "img", 40], tm.llava_inputs, (1, 8, 16)),
        Setup("llava-next-7b", llava_next_7b, [20, ("img", (672, 672)), 40], tm.llava_next_inputs, (1,)),
        Setup("qwen2vl-7b-image", qwen2vl_7b, [20, ("img", (48, 48)), 40], tm.qwen2_vl_inputs, (1,)),
        Setup("qwen2vl-7b-video", qwen2vl_7b, [20, ("vid", (16, 24, 24)), 40], tm.qwen2_vl_inputs, (1,)),
    ]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def install(model, method, keep_ratio):
    if method == "unpruned":
        return None
    name, _, variant = method.partition("/")
    if variant == "vision":
        return topv.apply(model, keep_ratio=keep_ratio, method=name, stage="vision", check_finite=False)
    return topv.apply(model, keep_ratio=keep_ratio, method=name, kv=variant or "after_k", check_finite=False)


@contextlib.contextmanager
def applied(model, method, keep_ratio):
    session = install(model, method, keep_ratio)
    try:
        yield session
    finally:
        if session is not None:
            topv.remove(model)


def prefill(model, inputs):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def decode(model, out, steps, device):
    """``steps`` greedy single-token steps after a prefill; per-step seconds. The prompts of a
    benchmark batch are identical (no padding), so no mask is passed: positions follow the cache
    (TopV supplies the unpruned ones where a pruned cache is shorter)."""
    cache, key = tm.cache_of(out), tm.cache_kwarg(model)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(steps):
        out, dt = _timed(lambda t=token: model(input_ids=t, use_cache=True, logits_to_keep=1, **{key: cache}), device)
        times.append(dt)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return times


def cache_mib(out) -> float:
    c = tm.cache_of(out)
    return sum(x.keys.numel() * x.keys.element_size() + x.values.numel() * x.values.element_size()
               for x in c.layers) / 2**20


_SDPA = {"_scaled_dot_product_flash_attention_for_cpu": "flash", "_scaled_dot_product_flash_attention": "flash",
         "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
         "_scaled_dot_product_attention_math": "math", "_flash_attention_forward": "flash-attn"}
_CUDA_SYNCS = re.compile(r"^cuda(StreamSynchronize|DeviceSynchronize|EventSynchronize|Memcpy|MemcpyAsync)$")


def _kernels(events) -> str:
    """Attention calls by kernel, e.g. "flashx32" or "efficientx31+eagerx1" (eager attention is
    the one softmax these models run)."""
    seen: dict[str, int] = {}
    for e in events:
        name = e.name.split("::")[-1]
        kind = _SDPA.get(name, "eager" if e.name == "aten::softmax" else None)
        if kind is not None:
            seen[kind] = seen.get(kind, 0) + 1
    return "+".join(f"{k}x{v}" for k, v in sorted(seen.items())) or "none"


@contextlib.contextmanager
def _quiet_profiler():
    """Drop kineto's profiler_start/stop lines (written to fd 2 by C++), keep anything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not re.search(r"profiler_(start|stop)$", line):
                    print(line, file=sys.stderr)


def profile_row(model, inputs, session, device, row):
    """One prefill and one decode step under the profiler: attention kernels, the step's device
    time and (CUDA) synchronising calls inside the language model's forward."""
    from torch.profiler import ProfilerActivity, profile, record_function

    lm = model.model.language_model
    ranges = []
    handles = [lm.register_forward_pre_hook(lambda *_: ranges.append(record_function("lm").__enter__())),
               lm.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None))]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if session is not None:
        session.profile = True
    try:
        with _quiet_profiler(), profile(activities=acts) as prof:
            out = prefill(model, inputs)
            _sync(device)
        pre_events = prof.events()
        with _quiet_profiler(), profile(activities=acts) as prof2:
            decode(model, out, 1, device)
        del out
    finally:
        for h in handles:
            h.remove()
        if session is not None:
            session.profile = False
    row.sdpa_prefill, row.sdpa_decode = _kernels(pre_events), _kernels(prof2.events())
    if device.type == "cuda":
        steps = [e for e in pre_events if e.name == "topv::step"]
        row.step_device_ms = sum(e.device_time_total for e in steps) / 1e3 if steps else None
        lm_ranges = [e.time_range for e in pre_events if e.name == "lm"]
        row.cuda_syncs = sum(1 for e in pre_events if _CUDA_SYNCS.match(e.name)
                             and any(r.start <= e.time_range.start <= r.end for r in lm_ranges))


def count_syncs(model, inputs) -> int:
    """Host synchronisations the integration's own code causes inside the language model's forward
    and the vision encoder's (where the vision stage captures)."""
    encoder = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    counter = SyncCounter(attribute="topv/integrations", active=False)
    handles = [h for mod in (model.model.language_model, encoder) for h in (
        mod.register_forward_pre_hook(lambda *_: setattr(counter, "active", True)),
        mod.register_forward_hook(lambda *_: setattr(counter, "active", False)))]
    try:
        with counter:
            prefill(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return len(counter.attributed())


def lm_graph_ms(model, inputs, session, device):
    """The language model's prefill alone, replayed from a CUDA graph (layout pinned)."""
    lm = model.model.language_model
    got = {}
    h = lm.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    try:
        prefill(model, inputs)
    finally:
        h.remove()
    kw = {k: got.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")}
    if session is not None:
        session.pin_layout(inputs, embeds=kw["inputs_embeds"])
    try:
        graph = common.capture_graph(lambda: lm(**kw, use_cache=True))
        graph.replay()
        times = [_timed(graph.replay, device)[1] for _ in range(10)]
        return statistics.median(times) * 1e3
    finally:
        if session is not None:
            session.pin_layout(None)


def runs(methods: list[str], ratios: list[float]) -> list[tuple[str, float | None]]:
    """(method, keep ratio) of every row: unpruned once, every other method at every ratio."""
    return ([("unpruned", None)] if "unpruned" in methods else []) + [
        (m, r) for r in ratios for m in methods if m != "unpruned"]


def measure(setup: Setup, model, inputs, configs, args, device) -> list[Row]:
    """Every (method, keep ratio) on this model and batch: warm-up, interleaved rounds, then
    per-row extras."""
    cfg = model.config
    B, T = inputs["input_ids"].shape
    ids = inputs["input_ids"][0]
    vis = int(((ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))).sum())
    attn = model.model.language_model.config._attn_implementation
    rows = {c: Row(setup.name, B, vis, T, c[0], c[1], attn) for c in configs}
    ttft = {c: [] for c in configs}
    steps = {c: [] for c in configs}
    host = {c: [] for c in configs}
    hooks_us = {c: [] for c in configs}
    with torch.inference_mode():
        for c in configs:  # warm-up: every row once, kernels and layout tables built
            try:
                with applied(model, *c):
                    decode(model, prefill(model, inputs), 2, device)
            except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
                rows[c].note = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        live = [c for c in configs if not rows[c].note]
        for r in range(args.rounds):
            for c in live:
                with applied(model, *c) as s:
                    out, dt = _timed(lambda: prefill(model, inputs), device)
                    ttft[c].append(dt)
                    if s is not None:
                        host[c].append(s.last.host_seconds)
                        rows[c].tokens_after_k = s.last.pruned_length
                    rows[c].kv_mib = cache_mib(out)
                    if s is not None:
                        s.decode_host_seconds, s.decode_steps = 0.0, 0
                    steps[c] += decode(model, out, args.decode_steps, device)
                    if s is not None:
                        hooks_us[c].append(s.decode_host_seconds / s.decode_steps * 1e6)
                    del out
            print(f"#   {setup.name} B={B}: round {r + 1}/{args.rounds} done", flush=True)
        for c in live:
            row = rows[c]
            row.ttft_ms = statistics.median(ttft[c]) * 1e3
            q = statistics.quantiles(steps[c], n=10) if len(steps[c]) > 1 else [steps[c][0]] * 9
            row.decode_ms, row.decode_p10_ms, row.decode_p90_ms = (statistics.median(steps[c]) * 1e3, q[0] * 1e3,
                                                                   q[-1] * 1e3)
            row.step_host_ms = statistics.median(host[c]) * 1e3 if host[c] else None
            row.decode_hooks_us = statistics.median(hooks_us[c]) if hooks_us[c] else None
            with applied(model, *c) as s:
                try:
                    row.syncs = count_syncs(model, inputs) if s is not None else None
                    profile_row(model, inputs, s, device, row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        before = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        decode(model, prefill(model, inputs), args.decode_steps, device)
                        row.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                        if s is None or s.settings.stage == "layer":
                            row.lm_graph_ms = lm_graph_ms(model, inputs, s, device)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.note = f"extras: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return [rows[c] for c in configs]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

COLUMNS = (("method", "method", 14, None), ("keep_ratio", "keep", 6, 3), ("ttft_ms", "TTFT ms", 9, 2),
           ("decode_ms", "dec ms", 8, 3),
           ("decode_p10_ms", "p10", 8, 3), ("decode_p90_ms", "p90", 8, 3), ("decode_hooks_us", "hooks us", 8, 1),
           ("peak_mib", "peak MiB", 9, 0),
           ("kv_mib", "KV MiB", 8, 1), ("step_host_ms", "step host", 9, 3), ("step_device_ms", "step dev", 8, 3),
           ("syncs", "syncs", 5, None), ("cuda_syncs", "cuda sync", 9, None), ("tokens_after_k", "tok>K", 6, None),
           ("sdpa_prefill", "SDPA prefill", 16, None), ("sdpa_decode", "SDPA decode", 16, None),
           ("lm_graph_ms", "lm graph", 8, 2))


def header() -> str:
    return " | ".join(f"{title:>{w}}" for _, title, w, _ in COLUMNS)


def fmt(row: Row) -> str:
    cells = []
    for key, _, w, p in COLUMNS:
        v = getattr(row, key)
        cells.append(f"{'-' if v is None or v == '' else (f'{v:.{p}f}' if p is not None else str(v)):>{w}}")
    return " | ".join(cells) + (f"  [{row.note}]" if row.note else "")


def check_out(out_root: str | None, env: dict) -> None:
    """Fail before any work when the results folder cannot be written."""
    if out_root is None:
        return
    folder = os.path.join(out_root, common.device_slug(env))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out: cannot create the folder {folder}: {e}") from None
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"--out: cannot write to {folder}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa", help="attention implementation: sdpa, eager, flash_attention_2, ...")
    ap.add_argument("--keep", default="0.25", help="comma-separated keep ratios; every pruning method runs at each")
    ap.add_argument("--setups", default=None, help="comma-separated setup names (default: all)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: each setup's)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated: unpruned or <method>[/{'|'.join(VARIANTS)}] (default {','.join(METHODS)})")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    ap.add_argument("--decode-steps", type=int, default=None, help="decode steps per round (default 32, quick 4)")
    common.add_out_argument(ap)
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.decode_steps = args.decode_steps or (4 if args.quick else 32)
    methods = args.methods.split(",")
    for m in methods:
        if method_error(m):
            ap.error(f"--methods: {method_error(m)}")
    try:
        ratios = [float(r) for r in args.keep.split(",")]
    except ValueError:
        ap.error(f"--keep must be comma-separated numbers in (0, 1], got {args.keep!r}")
    if not all(0.0 < r <= 1.0 for r in ratios):
        ap.error(f"--keep ratios must lie in (0, 1], got {args.keep}")
    all_setups = setups(args.quick)
    wanted = None if args.setups is None else args.setups.split(",")
    if wanted is not None and set(wanted) - {s.name for s in all_setups}:
        ap.error(f"unknown setups {sorted(set(wanted) - {s.name for s in all_setups})}; choose from "
                 f"{[s.name for s in all_setups]}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.quick and device.type == "cpu":
        # Tiny models' ops are too small to split across threads, and a second thread that has to
        # wait for a busy core stalls every op by a scheduler tick.
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = common.environment()
    if device.type != "cuda" and torch.cuda.is_available():
        env["device"] = common._cpu_name()  # a CPU run on a GPU machine: the rows are the CPU's
    check_out(args.out, env)
    print(f"# {env['device']} | torch {env['torch']} | transformers {env['transformers']} | {env['commit']}")
    print(f"# random {dtype} weights (speed and memory depend on shapes only); keep {args.keep}; attn {args.attn}; "
          f"{args.rounds} interleaved rounds x {args.decode_steps} decode steps; check_finite=False")
    rows = []
    for setup in all_setups:
        if wanted is not None and setup.name not in wanted:
            continue
        t0 = time.perf_counter()
        model = tm.build(setup.config(args.attn), dtype=dtype, device=device)
        gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"# {setup.name}: {gib:.2f} GiB of weights built in {time.perf_counter() - t0:.1f} s", flush=True)
        for B in setup.batches if args.batches is None else [int(b) for b in args.batches.split(",")]:
            inputs = setup.inputs(model.config, [setup.prompt] * B, dtype=dtype, device=device)
            print(f"# {setup.name} B={B}: {inputs['input_ids'].shape[1]} prompt tokens", flush=True)
            print(header())
            got = measure(setup, model, inputs, runs(methods, ratios), args, device)
            for r in got:
                print(fmt(r), flush=True)
            rows += got
            if args.out is not None:
                path = common.append_rows(args.out, "e2e", env, [asdict(r) for r in got])
                print(f"# appended {len(got)} rows to {path}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if not any(r.note.startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
