"""Benchmark of topv.prune (3 Sinkhorn iterations) on realistic VLM shapes, every provider in one run.

Providers: the eager reference, torch.compile(reference), and topv's Triton and CUDA backends,
each launched from Python and replayed from a CUDA graph. Reported per row: median µs, achieved
TFLOP/s (cost GEMM FLOPs 2·B·n²·d over the time) and GB/s (feature bytes read once), the ratio
to the floor (max of GEMM FLOPs at the measured bf16 matmul rate and input bytes at the measured
copy bandwidth), the speed-up over the eager reference, and peak temporary memory.

The GPU backends hold a segment's n² fp32 cost whole when it fits their workspace cap and stream it
in row slabs otherwise; for segments of n >= 8192 each GPU backend also runs at the caps of
``--workspaces`` (provider ``cuda@512MiB``: that cap), the time-vs-workspace curve.

    python bench/bench_prune.py [--configs llava15-b1,qwen2vl-16k] [--providers triton,cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    CONFIGS,
    Result,
    add_out_argument,
    available_providers,
    ceilings,
    environment,
    finish,
    measure,
    print_table,
    progress,
)

import topv  # noqa: E402
from topv import reference  # noqa: E402

PROVIDERS = ("reference", "compile", "triton", "cuda")


def make_inputs(cfg, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, cfg.dtype)
    shared = torch.randn(cfg.d, device="cuda", generator=g)
    src = (torch.randn(cfg.B, cfg.n, cfg.d, device="cuda", generator=g) + 0.5 * shared).to(dt)
    tgt = (src.float() * (1 + 0.3 * torch.randn(cfg.d, device="cuda", generator=g))
           + 0.3 * torch.randn(cfg.B, cfg.n, cfg.d, device="cuda", generator=g)).to(dt)
    side = int(round(cfg.n**0.5))
    pos = topv.grid_positions(side, cfg.n // side, device="cuda") if side * (cfg.n // side) == cfg.n else \
        torch.rand(cfg.n, 2, device="cuda", generator=g)
    return src, tgt, pos


def provider_fn(name, cfg, src, tgt, pos):
    if name == "reference":
        pos_b = pos.expand(cfg.B, cfg.n, 2)
        return lambda: reference.prune_padded(src, tgt, pos_b, cfg.keep)
    if name == "compile":
        pos_b = pos.expand(cfg.B, cfg.n, 2)
        compiled = torch.compile(reference.prune_padded)
        return lambda: compiled(src, tgt, pos_b, cfg.keep)
    backend, _, cap = name.partition("@")
    backend = backend.split("+")[0]
    check = name.endswith("+check")
    ws = _MIB[cap] if cap else None
    return lambda: topv.prune(src, tgt, pos, cfg.keep, backend=backend, check_finite=check, max_workspace=ws)


_MIB = {"192MiB": 192 << 20, "512MiB": 512 << 20, "1GiB": 1 << 30, "2GiB": 2 << 30}


def _shared(kept, ref, n):
    """Share of the kept tokens that the reference keeps too (sets per row: one swap at the budget's
    boundary moves every later index of an ascending list, so compare sets, not positions)."""
    mark = lambda k: torch.zeros(k.shape[0], n, device=k.device).scatter_(1, k, 1.0)  # noqa: E731
    return ((mark(kept) * mark(ref)).sum() / kept.numel()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--skip-reference-above", type=int, default=16384,
                    help="skip the eager/compiled reference for n above this (they hold an n² fp32 cost)")
    ap.add_argument("--workspaces", default="192MiB,512MiB,1GiB,2GiB",
                    help="workspace caps the GPU backends also run at, for n >= 8192 (of " + ",".join(_MIB) + ")")
    add_out_argument(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_prune.py needs a CUDA device")

    env, ceil = environment(), ceilings()
    print(f"# {env}\n# ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s")
    providers = available_providers(args.providers)
    if "triton" in providers:
        providers.insert(providers.index("triton") + 1, "triton+check")
    if "cuda" in providers:
        providers.insert(providers.index("cuda") + 1, "cuda+check")
    results = []
    configs = [c for c in CONFIGS if c.name in args.configs.split(",")]
    print_table([])
    for i, cfg in enumerate(configs, 1):
        progress(i, len(configs), f"{cfg.name}: B={cfg.B} n={cfg.n} d={cfg.d} keep={cfg.keep}")
        src, tgt, pos = make_inputs(cfg)
        flops = 2.0 * cfg.B * cfg.n * cfg.n * cfg.d
        nbytes = 2.0 * src.numel() * src.element_size()
        floor_us = 1e6 * max(flops / (ceil["bf16_matmul_tflops"] * 1e12), nbytes / (ceil["copy_gbps"] * 1e9))
        ref_kept, ref_us = None, {}
        extra = [f"{p}@{w}" for p in providers if p in ("triton", "cuda") for w in args.workspaces.split(",") if w] \
            if cfg.n >= 8192 else []
        for prov in providers + extra:
            if prov in ("reference", "compile") and cfg.n > args.skip_reference_above:
                continue
            fn = provider_fn(prov, cfg, src, tgt, pos)
            try:
                kept = fn()[0]
                torch.cuda.synchronize()
            except Exception as e:  # a provider that cannot run this shape is reported, not fatal
                results.append(Result(cfg.name, prov, "python", None, note=f"failed: {type(e).__name__}: {e}"[:200]))
                continue
            note = ""
            if prov == "reference":
                ref_kept = kept
            elif ref_kept is not None:
                note = f"kept set shared with the reference: {100 * _shared(kept, ref_kept, cfg.n):.1f}%"
            modes = ["python"] if prov.endswith("+check") else ["python", "graph"]
            measure(results, cfg.name, prov, fn, modes, flops=flops, nbytes=nbytes, floor_us=floor_us, ref_us=ref_us,
                    note=note)
        del src, tgt, pos
        torch.cuda.empty_cache()
    finish(results, env, ceil, "prune", args.out)


if __name__ == "__main__":
    main()
