# ruff: noqa: B023, E731  (benchmark lambdas run inside the loop that defines them)
"""Per-kernel profile of the Triton backend (bench/bench_prune.py is the benchmark of record).

python bench/profile_triton.py [--quick] [--sweep]: per shape, prune from Python (wall), replayed
from a CUDA graph, temporary memory, a per-kernel GPU-time breakdown, and a float64 check at the
large shapes. --sweep adds host-overhead numbers, a GEMM tile sweep on one n=16384 slab and block
sweeps at n=576 (B=1, 16). --quick skips the eager-reference timings.
"""

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

import topv
from topv import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_graph  # noqa: E402  (bench/common.py: one CUDA-graph timing for every benchmark)

SHAPES = [  # (B, n, d, keep)
    (1, 576, 4096, 144),
    (16, 576, 4096, 144),
    (1, 2880, 4096, 720),
    (1, 3328, 4096, 832),
    (1, 16384, 3584, 4096),
]


def make(B, n, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(B, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    tgt = torch.randn(B, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    side = int(n ** 0.5)
    pos = torch.rand(n, 2, device="cuda", generator=g) if side * side != n else topv.grid_positions(side, side).cuda()
    return src, tgt, pos


def wall_us(fn, reps):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def breakdown(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t, e.count, e.key[:40]))
    rows.sort(reverse=True)
    return " | ".join(f"{k} x{c} {t:.0f}us" for t, c, k in rows[:6])


def main(quick: bool):
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print(f"{'shape':28s} {'py_us':>9s} {'graph_us':>9s} {'tmp_MiB':>8s}  breakdown")
    for B, n, d, k in SHAPES:
        src, tgt, pos = make(B, n, d)
        fn = lambda: topv.prune(src, tgt, pos, k, check_finite=False, backend="triton")
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        tmp = (torch.cuda.max_memory_allocated() - base) / 2**20
        reps = 5 if n >= 16384 else 100
        py = wall_us(fn, reps)
        gr = bench_graph(fn) if n < 16384 else float("nan")
        print(f"B={B:<3d} n={n:<6d} d={d:<5d} k={k:<5d} {py:9.1f} {gr:9.1f} {tmp:8.1f}  {breakdown(fn)}", flush=True)
        if n in (2880, 16384):  # against the float64 reference, on the GPU
            kept, sc = fn()
            rk, rs = reference.prune_padded(src.double(), tgt.double(), pos.double().expand(B, n, 2), k)
            same = len(set(kept[0].tolist()) & set(rk[0].tolist()))
            print(f"    vs float64 reference: max|dscore| {(sc.double() - rs).abs().max().item():.2e}, "
                  f"kept overlap {same}/{k}", flush=True)
            del rk, rs
            torch.cuda.empty_cache()
        if not quick and n == 576:
            ref = lambda: reference.prune_padded(src, tgt, pos.expand(B, n, 2), k)
            print(f"    eager reference: {wall_us(ref, 20):.1f} us; checked prune: {wall_us(lambda: topv.prune(src, tgt, pos, k, backend='triton'), 50):.1f} us")


def overheads():
    """Host-side cost: the public op, the launcher alone, and one empty Triton launch."""
    from topv import _triton
    from topv.ops import PruneParams, Segments

    @triton.jit
    def _nop(x_ptr, n, BLOCK: tl.constexpr):
        pass

    src, tgt, pos = make(1, 576, 4096)
    x = torch.empty(1, device="cuda")
    params = PruneParams(**topv.defaults.PRUNE)
    segs = Segments.of((576,), (144,), True)
    s2, t2 = src.view(-1, 4096), tgt.view(-1, 4096)
    op = wall_us(lambda: topv.prune(src, tgt, pos, 144, check_finite=False, backend="triton"), 200)
    launcher = wall_us(lambda: _triton.prune(s2, t2, pos, segs, params, False), 200)
    nop = wall_us(lambda: _nop[(1,)](x, 1, BLOCK=16), 500)
    print(f"host: topv.prune {op:.1f} us, _triton.prune {launcher:.1f} us, empty triton launch {nop:.1f} us")
    import cProfile
    import io
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        _triton.prune(s2, t2, pos, segs, params, False)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(8)
    print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-1600:])


def gemm_sweep():
    """One streamed slab of the n=16384, d=3584 GEMM+epilogue under several tile configs."""
    from topv import _triton
    n, d, rows = 16384, 3584, 3280
    src, tgt, pos = make(1, n, d)
    s2, t2 = src.view(n, d), tgt.view(n, d)
    inv = torch.empty(2 * n, device="cuda")
    _triton._inv_norms(s2[None], inv[:n], t2[None], inv[n:], False, None, None)
    out = torch.empty(rows * n, device="cuda")
    ref = None
    orig = _triton._cost_config
    for cfg in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                (128, 128, 128, 8, 3), (128, 128, 64, 4, 4)]:
        _triton._cost_config = lambda tiles, dtype, cfg=cfg: cfg
        fn = lambda: _triton._launch_cost(
            s2, t2, pos, pos, inv[:n], inv[n:], out, out, padded=True, n_pad=n, m_pad=n, n_seg=1, d=d,
            row_lo=0, row_hi=rows, c_row0=0, s_strides=(0, d, 1), t_strides=(0, d, 1), p_strides=(0, 2, 1),
            q_strides=(0, 2, 1), c_sb=0, ldc=n, alpha=1.0, beta=1.0, gamma=0.3, sigma=0.2, out_scale=14.4,
            rows_max=rows, cols_max=n)
        try:
            us = triton.testing.do_bench(fn, warmup=5, rep=50) * 1e3
            err = 0.0 if ref is None else (out - ref).abs().max().item()
            if ref is None:
                ref = out.clone()
            print(f"gemm slab {cfg}: {us:.0f} us, {2 * rows * n * d / us / 1e6:.0f} TFLOP/s, max|diff| {err:.2e}", flush=True)
        except Exception as e:  # a config that does not fit shared memory
            print(f"gemm slab {cfg}: failed ({type(e).__name__})")
    _triton._cost_config = orig


def sweep():
    """Graph-replayed prune time for alternative block sizes at the LLaVA shapes."""
    from topv import _triton
    cost_cfgs = [(64, 64, 128, 4, 3), (64, 64, 256, 4, 3), (64, 128, 64, 4, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3)]
    orig_cost, orig_row = _triton._cost_config, _triton._row_config
    for B in (1, 16):
        src, tgt, pos = make(B, 576, 4096)
        fn = lambda: topv.prune(src, tgt, pos, 144, check_finite=False, backend="triton")
        line = []
        for cfg in cost_cfgs:
            _triton._cost_config = lambda tiles, dtype, cfg=cfg: cfg
            line.append(f"cost{cfg[:3]}={bench_graph(fn):.1f}")
        _triton._cost_config = orig_cost
        orig_split = _triton._split_k
        for split in (1, 2, 3, 4):
            _triton._split_k = lambda tiles, d, dtype, split=split: split
            line.append(f"split{split}={bench_graph(fn):.1f}")
        _triton._split_k = orig_split
        for bm in (4, 8, 16):
            _triton._row_config = lambda n, m, s, bm=bm: (bm, 1024, True, 8 if bm * 1024 >= 8192 else 4)
            line.append(f"row{bm}={bench_graph(fn):.1f}")
        _triton._row_config = orig_row
        print(f"sweep B={B}: " + " ".join(line), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the eager-reference timings")
    ap.add_argument("--sweep", action="store_true", help="also the host overheads and the GEMM / row-block sweeps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_triton.py needs a CUDA device")
    main(args.quick)
    if args.sweep:
        overheads()
        gemm_sweep()
        sweep()
