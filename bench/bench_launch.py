"""Host cost of a prune call from Python: the public entry points against the native launcher alone.

On a tiny problem (B=1, n=16, d=32, the C++ backend of the tensors' device) the kernels take a few
µs, so the difference between ``topv.prune`` (or ``torch.ops.topv.prune``) and a direct call of
the native op ``torch.ops.topv.prune_native`` is what the checks, the backend resolution and the
dispatch cost. Medians of many calls (wall clock, host only: CPU tensors, or CUDA tensors with the
GPU kept ahead of the host).

    python bench/bench_launch.py [--device cpu] [--calls 20000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_out_argument, append_rows, environment, progress  # noqa: E402

import topv  # noqa: E402
from topv import defaults as D  # noqa: E402


def _median_us(fn, calls: int, rounds: int = 7) -> tuple[float, float]:
    """Median (and spread: max - min of the rounds' medians) of per-call µs over `rounds` rounds."""
    for _ in range(200):
        fn()
    per_round = []
    for _ in range(rounds):
        t = []
        for _ in range(calls // rounds):
            t0 = time.perf_counter_ns()
            fn()
            t.append(time.perf_counter_ns() - t0)
        per_round.append(statistics.median(t) / 1e3)
    return statistics.median(per_round), max(per_round) - min(per_round)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=20000)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    backend = "cuda" if dev.type == "cuda" else "cpp"
    if backend not in topv.available_backends(dev):
        sys.exit(f"bench_launch: the {backend!r} backend is not available ({topv.available_backends(dev)})")
    env = environment()
    print(f"# {env}\n# host µs per call, B=1, n=16, d=32, backend {backend!r}, {args.calls} calls")
    torch.set_num_threads(1)  # the kernels' own threading would only add noise here
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 16, 32, generator=g).to(dev)
    tgt = torch.randn(1, 16, 32, generator=g).to(dev)
    pos = topv.grid_positions(4, 4, device=dev)
    p = D.PRUNE
    native = torch.ops.topv.prune_native.default
    cases = {
        "native launcher": lambda: native(src, tgt, pos, [16], [4], True, p["alpha"], p["beta"], p["gamma"], p["sigma"],
                                          p["eps"], p["tau"], p["n_iters"], p["tol"], p["recover_ratio"], False, 0),
        "topv.prune": lambda: topv.prune(src, tgt, pos, 4, check_finite=False, backend=backend),
        "topv.prune auto": lambda: topv.prune(src, tgt, pos, 4, check_finite=False),
        "torch.ops.topv.prune": lambda: torch.ops.topv.prune(src, tgt, pos, [4], check_finite=False, backend=backend),
    }
    rows = []
    for i, (name, fn) in enumerate(cases.items(), 1):
        progress(i, len(cases), name)
        us, spread = _median_us(fn, args.calls)
        rows.append({"config": f"{dev.type}-b1-n16", "provider": name, "mode": "python", "us": us,
                     "spread_us": spread})
    base = rows[0]["us"]
    print(f"\n{'entry point':<24}{'µs':>8}{'spread':>8}{'overhead':>10}")
    for r in rows:
        r["overhead_us"] = r["us"] - base
        print(f"{r['provider']:<24}{r['us']:>8.1f}{r['spread_us']:>8.1f}{r['overhead_us']:>10.1f}")
    if args.out:
        print(f"# appended {len(rows)} rows to {append_rows(args.out, 'launch', env, rows)}")


if __name__ == "__main__":
    main()
