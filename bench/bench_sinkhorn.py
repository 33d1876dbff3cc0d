"""Benchmark of topv.sinkhorn alone (3 iterations on a stored fp32 cost), every provider in one run.

Providers: the eager reference, torch.compile(reference), POT's batched log-domain solver with its
torch backend (``ot.batch.bregman_log_projection_batch`` on K = -C/eps), and topv's Triton and
CUDA backends; each launched from Python and replayed from a CUDA graph (POT syncs with the host
inside its loop, so it is timed from Python only). GB/s counts one fp32 read of C per iteration,
the floor is those bytes at the measured copy bandwidth.

    python bench/bench_sinkhorn.py [--configs ...] [--providers ...] [--out bench/results]
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

PROVIDERS = ("reference", "compile", "pot", "triton", "cuda")
EPS, ITERS = 0.1, 3


def provider_fn(name, C):
    if name == "reference":
        return lambda: reference.sinkhorn(C, eps=EPS, n_iters=ITERS)
    if name == "compile":
        compiled = torch.compile(reference.sinkhorn)
        return lambda: compiled(C, eps=EPS, n_iters=ITERS)
    if name == "pot":
        from ot.backend import get_backend
        from ot.batch import bregman_log_projection_batch

        K = -C / EPS
        nx = get_backend(K)
        # POT builds its default uniform marginals on the CPU; give them on K's device.
        a = torch.full(C.shape[:2], 1.0 / C.shape[1], device=C.device)
        b = torch.full((C.shape[0], C.shape[2]), 1.0 / C.shape[2], device=C.device)

        def run():
            out = bregman_log_projection_batch(K, a, b, nx=nx, max_iter=ITERS, tol=0.0)
            return out["potentials"]

        return run
    return lambda: topv.sinkhorn(C, eps=EPS, n_iters=ITERS, backend=name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    add_out_argument(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sinkhorn.py needs a CUDA device")
    env, ceil = environment(), ceilings()
    print(f"# {env}\n# ceilings: copy {ceil['copy_gbps']:.0f} GB/s")
    providers = available_providers(args.providers)
    if "pot" in providers:
        try:
            import ot  # noqa: F401
        except ImportError:
            print("# POT not installed: skipping provider 'pot'")
            providers.remove("pot")
    results = []
    configs = [c for c in CONFIGS if c.name in args.configs.split(",")]
    print_table([])
    for i, cfg in enumerate(configs, 1):
        progress(i, len(configs), f"{cfg.name}: B={cfg.B} n={cfg.n} (3 iterations on a stored fp32 cost)")
        g = torch.Generator(device="cuda").manual_seed(1)
        C = torch.rand(cfg.B, cfg.n, cfg.n, device="cuda", generator=g) * 2
        nbytes = ITERS * C.numel() * 4.0
        floor_us = 1e6 * nbytes / (ceil["copy_gbps"] * 1e9)
        ref_us = {}
        for prov in providers:
            fn = provider_fn(prov, C)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as e:
                results.append(Result(cfg.name, prov, "python", None, note=f"failed: {type(e).__name__}: {e}"[:200]))
                continue
            measure(results, cfg.name, prov, fn, ["python"] if prov == "pot" else ["python", "graph"],
                    nbytes=nbytes, floor_us=floor_us, ref_us=ref_us)
        del C
        torch.cuda.empty_cache()
    finish(results, env, ceil, "sinkhorn", args.out)


if __name__ == "__main__":
    main()
