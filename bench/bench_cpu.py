"""Benchmark of topv.prune on CPU: the C++ kernels (backend="cpp") against the eager reference.

The issue's CPU target is n = 576, d = 1024 on the 2-core CI machine. Besides the two providers it
times, as ceilings, the cost GEMM alone through torch (fp32 matmul, which is what the reference and
the fp32 path of the C++ kernels pay, and bf16 matmul with its bf16 output). Every round calls
each provider twice in a row, so a noisy shared machine slows them alike: mode "interleaved" is the
first call (caches hold what the other providers used), "warm" the second. Each row is the median
over the rounds. Reported: median ms, GEMM GFLOP/s (2·B·n²·d over the time) and the
speed-up over the eager reference (whose GEMM is torch's fp32 matmul). The ceiling to compare the
GFLOP/s with is the core count times the per-core peak of one FMA-type instruction stream
(vfmadd / vdpbf16ps): on the 2-core AMD EPYC (Zen 5) CI machine both issue ~3.65 G/s per core,
i.e. 233 GFLOP/s bf16 and 116 GFLOP/s fp32 per core (measured 2026-12-06).

    python bench/bench_cpu.py [--configs cpu-b1,cpu-b4] [--dtypes float32,bfloat16] [--rounds 30] [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Config, Result, add_out_argument, append_rows, environment, progress  # noqa: E402

import topv  # noqa: E402
from topv import reference  # noqa: E402

CONFIGS = [Config("cpu-b1", 1, 576, 1024), Config("cpu-b4", 4, 576, 1024), Config("llava15-b1", 1, 576, 4096)]


def cpu_environment() -> dict:
    env = environment()  # its device is the CPU's model name
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    blas = [line.strip() for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line
            or "MKL-DNN" in line or "oneDNN" in line or "OpenBLAS" in line]
    env.update(threads=torch.get_num_threads(), blas="; ".join(blas),
               cpu_flags=" ".join(sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))))
    return env


def make_inputs(cfg, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(cfg.d, generator=g)
    src = torch.randn(cfg.B, cfg.n, cfg.d, generator=g) + 0.5 * shared
    tgt = src * (1 + 0.3 * torch.randn(cfg.d, generator=g)) + 0.3 * torch.randn(cfg.B, cfg.n, cfg.d, generator=g)
    side = int(round(cfg.n**0.5))
    pos = topv.grid_positions(side, cfg.n // side)
    return src.to(dtype), tgt.to(dtype), pos


def providers(cfg, src, tgt, pos):
    pos_b = pos.expand(cfg.B, cfg.n, 2)
    s32, t32 = src.float(), tgt.float()
    out = {
        "reference": lambda: reference.prune_padded(src, tgt, pos_b, cfg.keep),
        "cpp": lambda: topv.prune(src, tgt, pos, cfg.keep, backend="cpp"),
        # The C++ cost op alone (GEMM + epilogue), and torch's GEMMs of the same shape.
        "cpp cost_matrix": lambda: topv.cost_matrix(src, tgt, pos, backend="cpp"),
        "torch bmm fp32": lambda: torch.bmm(s32, t32.transpose(1, 2)),
    }
    if src.dtype == torch.bfloat16:
        out["torch bmm bf16"] = lambda: torch.bmm(src, tgt.transpose(1, 2))  # bf16 output
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def print_rows(results, header=False):
    if header:
        print(f"{'config':<20}{'provider':<18}{'mode':<13}{'ms':>9}{'GFLOP/s':>9}{'x ref':>7}  note")
    for r in results:
        print(f"{r.config:<20}{r.provider:<18}{r.mode:<13}{r.us / 1e3:>9.3f}{r.tflops * 1e3:>9.0f}"
              f"{r.speedup_vs_reference:>7.2f}  {r.note}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="cpu-b1,cpu-b4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=30)
    add_out_argument(ap)
    args = ap.parse_args()
    if "cpp" not in topv.available_backends("cpu"):
        sys.exit("bench_cpu: topv._C (the C++ CPU kernels) is not built")
    env = cpu_environment()
    print("#", env)
    by_name = {c.name: c for c in CONFIGS}
    results = []
    steps = [(name, dt) for name in args.configs.split(",") for dt in args.dtypes.split(",")]
    print_rows([], header=True)
    for i, (name, dt) in enumerate(steps, 1):
        progress(i, len(steps), f"{name} {dt}, {args.rounds} rounds")
        base = by_name[name]
        cfg = Config(base.name, base.B, base.n, base.d, base.keep_ratio, dt)
        src, tgt, pos = make_inputs(cfg, getattr(torch, dt))
        fns = providers(cfg, src, tgt, pos)
        for fn in fns.values():
            fn()  # warm-up: thread pool, allocator, first-touch
        # Each round calls every provider twice in a row: the first call ("interleaved") starts
        # with the caches the other providers left, as inside a model's forward; the second
        # ("warm") with its own. Both modes see the machine in the same minute.
        times = {(mode, k): [] for mode in ("interleaved", "warm") for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times["interleaved", k].append(timed(fn))
                times["warm", k].append(timed(fn))
        flops = 2.0 * cfg.B * cfg.n * cfg.n * cfg.d
        nbytes = 2.0 * src.numel() * src.element_size()
        median_us = {key: sorted(ts)[args.rounds // 2] * 1e6 for key, ts in times.items()}
        for (mode, k), us in median_us.items():
            results.append(Result(f"{name}-{dt}", k, mode, us, tflops=flops / (us * 1e-6) / 1e12,
                                  gbps=nbytes / (us * 1e-6) / 1e9,
                                  speedup_vs_reference=median_us[mode, "reference"] / us,
                                  note="" if k in ("reference", "cpp") else "not a prune: GEMM (+ epilogue) only"))
            print_rows(results[-1:])
    print()
    print_rows(results, header=True)
    if args.out:
        machine = {k: env[k] for k in ("threads", "blas", "cpu_flags")}
        rows = [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "extra"}, "extra": json.dumps(machine)}
                for r in results]
        print(f"# appended {len(rows)} rows to {append_rows(args.out, 'prune', env, rows)}")


if __name__ == "__main__":
    main()
