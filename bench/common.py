"""Shared benchmark harness: configs, timing from Python and from CUDA graphs, measured ceilings,
and result rows tagged with the device, versions and git commit.

Timing: the median of ``triton.testing.do_bench`` (which clears L2 between runs: cold L2) for
calls launched from Python, and the median over replays of a CUDA graph holding one call. The
ceilings (bf16 matmul rate, copy bandwidth) are measured in the same run on the same device.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Config:
    name: str
    B: int
    n: int
    d: int
    keep_ratio: float = 0.25
    dtype: str = "bfloat16"

    @property
    def keep(self) -> int:
        return max(1, round(self.keep_ratio * self.n))


CONFIGS = [
    Config("llava15-b1", 1, 576, 4096),
    Config("llava15-b16", 16, 576, 4096),
    Config("llava15-b64", 64, 576, 4096),
    Config("llava-next", 1, 2880, 4096),
    Config("internvl2", 1, 3328, 4096),
    Config("qwen2vl-16k", 1, 16384, 3584),
]


@dataclass
class Result:
    config: str
    provider: str
    mode: str  # "python" (launched from Python) or "graph" (replayed from a CUDA graph)
    us: float | None
    tflops: float | None = None
    gbps: float | None = None
    floor_ratio: float | None = None
    speedup_vs_reference: float | None = None
    temp_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def environment() -> dict:
    """Device, versions and git commit of a benchmark run."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    # The GPU machine gets a copy of the tree without .git: the caller passes TOPV_COMMIT there.
    here = os.path.dirname(os.path.abspath(__file__))
    sha = os.environ.get("TOPV_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip() or "unknown"
    dirty = "" if os.environ.get("TOPV_COMMIT") else subprocess.run(
        ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=here).stdout.strip()
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "commit": sha + ("+dirty" if dirty else ""),
    }


def bench_python(fn, *, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median microseconds of fn() launched from Python (cold L2, device events)."""
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def available_providers(requested: str) -> list[str]:
    """The comma-separated providers, less topv backends (``triton``, ``cuda``, and their
    ``+check`` variants) that this machine cannot run."""
    import topv

    avail = topv.available_backends("cuda")
    return [p for p in requested.split(",") if p.split("+")[0] not in ("triton", "cuda") or p.split("+")[0] in avail]


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding one fn() call, after two warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def bench_graph(fn, *, rep_ms: int = 300) -> float:
    """Median microseconds per replay of a CUDA graph that holds one fn() call."""
    from triton.testing import do_bench

    graph = capture_graph(fn)
    return 1e3 * do_bench(graph.replay, warmup=20, rep=rep_ms, return_mode="median")


def measure(results: list, config: str, provider: str, fn, modes, *, nbytes: float, floor_us: float, ref_us: dict,
            flops: float | None = None, note: str = "") -> None:
    """Time fn in each mode ("python", "graph"), append one Result per mode and print it.
    ``ref_us`` collects the reference provider's times for the speed-up column."""
    keep_alive: list = []
    mem = temp_mib(fn, keep_alive)
    keep_alive.clear()
    for mode in modes:
        try:
            us = bench_python(fn) if mode == "python" else bench_graph(fn)
        except Exception as e:  # a provider that cannot run a mode is reported, not fatal
            results.append(Result(config, provider, mode, None, note=f"failed: {type(e).__name__}: {e}"[:200]))
            continue
        if provider == "reference":
            ref_us[mode] = us
        results.append(Result(
            config, provider, mode, us, tflops=None if flops is None else flops / (us * 1e-6) / 1e12,
            gbps=nbytes / (us * 1e-6) / 1e9, floor_ratio=us / floor_us,
            speedup_vs_reference=ref_us[mode] / us if mode in ref_us else None, temp_mib=mem, note=note))
        print_table(results[-1:], header=False)


def finish(results: list, env: dict, ceil: dict, out_prefix: str) -> None:
    print()
    print_table(results)
    write(results, env, ceil, out_prefix)
    print(f"# wrote {out_prefix}.json/.csv")


def temp_mib(fn, keep_alive) -> float:
    """Peak device memory allocated during one fn() call above what was live before it, in MiB
    (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    keep_alive.append(out)
    return peak / 2**20


def ceilings() -> dict:
    """Measured bf16 matmul TFLOP/s and device-to-device copy GB/s (read + write bytes)."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    return {"bf16_matmul_tflops": tflops, "copy_gbps": gbps}


def write(results: list[Result], env: dict, ceil: dict, out_prefix: str) -> None:
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
        json.dump({"environment": env, "ceilings": ceil, "results": [asdict(r) for r in results]}, f, indent=1)
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = [k for k in asdict(results[0]) if k != "extra"] + list(env)
        w.writerow(cols)
        for r in results:
            row = asdict(r)
            w.writerow([row[k] for k in cols if k in row] + list(env.values()))


def print_table(results: list[Result], header: bool = True) -> None:
    hdr = f"{'config':<14}{'provider':<22}{'mode':<8}{'µs':>11}{'TFLOP/s':>9}{'GB/s':>8}{'x floor':>9}{'x ref':>8}{'MiB':>8}  note"
    if header:
        print(hdr)
        print("-" * len(hdr))
    fmt = lambda v, p: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        print(f"{r.config:<14}{r.provider:<22}{r.mode:<8}{fmt(r.us, 1):>11}{fmt(r.tflops, 0):>9}{fmt(r.gbps, 0):>8}"
              f"{fmt(r.floor_ratio, 1):>9}{fmt(r.speedup_vs_reference, 0):>8}{fmt(r.temp_mib, 0):>8}  {r.note}")
    sys.stdout.flush()
