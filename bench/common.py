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
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "commit": sha + ("+dirty" if dirty else ""),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu " + (platform.processor() or "unknown")


def progress(i: int, total: int, what: str) -> None:
    """One line per step, so a long run shows where it is."""
    print(f"# [{i}/{total}] {what}", flush=True)


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


def finish(results: list, env: dict, ceil: dict, bench: str, out_root: str | None) -> None:
    """Print the run's table; with ``out_root``, append its rows to out_root/<device>/<bench>.csv."""
    print()
    print_table(results)
    if out_root:
        path = append_rows(out_root, bench, env, [_row(r, ceil) for r in results])
        print(f"# appended {len(results)} rows to {path}")


def _row(r: Result, ceil: dict) -> dict:
    row = {k: v for k, v in asdict(r).items() if k != "extra"}
    row["extra"] = json.dumps({**r.extra, **{f"ceiling_{k}": v for k, v in ceil.items()}}, sort_keys=True)
    return row


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


# Results that last: one CSV per benchmark and device under bench/results/<device>/, rows only ever
# appended (a run never rewrites another's), each tagged with when, which commit and which
# versions. bench/tables.py draws the README's tables from them.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IDENTITY = ("time_utc", "commit", "device", "torch", "cuda", "triton", "transformers", "python")


def device_slug(env: dict) -> str:
    """A folder name for the device, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc'."""
    return "-".join("".join(c if c.isalnum() else " " for c in env["device"].lower()).split())


def add_out_argument(ap) -> None:
    ap.add_argument("--out", metavar="DIR", help="append the rows to DIR/<device>/<bench>.csv (the committed results: "
                                                 "bench/results); without it the run only prints")


def append_rows(out_root: str, bench: str, env: dict, rows: list[dict]) -> str:
    """Append ``rows`` (dicts with the same keys) to out_root/<device>/<bench>.csv, each prefixed
    with the run's identity; a new file gets a header. Returns the path."""
    import datetime

    path = os.path.join(out_root, device_slug(env), f"{bench}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ident = {"time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             **{k: env.get(k) for k in IDENTITY[1:]}}
    full = [{**ident, **r} for r in rows]
    cols = list(full[0])
    if os.path.exists(path):
        with open(path, newline="") as f:
            have = next(csv.reader(f), None)
        if have != cols:
            raise SystemExit(f"{path} has the columns {have}, this run writes {cols}: write to a new --out")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerows(full)
    return path


def read_rows(out_root: str, bench: str, device: str) -> list[dict]:
    path = os.path.join(out_root, device, f"{bench}.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
