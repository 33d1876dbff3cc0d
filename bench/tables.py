"""The README's result tables, drawn from the benchmark rows under bench/results/<device>/<bench>.csv.

    python bench/tables.py            # print every table
    python bench/tables.py --write    # rewrite the README's tables (between <!-- table: NAME --> and <!-- /table -->)
    python bench/tables.py --check    # exit 1 when the README's tables differ from the CSVs (a test runs this)

Each table shows one run: the latest rows of its (device, benchmark) by time, or the run of a
given commit; the end-to-end table shows the latest two runs, one block each. A cell is a median in µs (ms for CPU) as the benchmark measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, read_rows  # noqa: E402

README = os.path.join(os.path.dirname(RESULTS), os.pardir, "README.md")
GPU = "nvidia-h100-80gb-hbm3"


def _runs(rows: list[dict]) -> list[str]:
    return sorted({r["time_utc"] for r in rows})


def _of_commit(rows: list[dict], commit: str | None) -> list[dict]:
    """The rows of ``commit`` (a dirty tree's ``<sha>+`` included); every row when None."""
    return [r for r in rows if r["commit"].split("+")[0] == commit] if commit else rows


def _pick(rows: list[dict], commit: str | None = None) -> list[dict]:
    """The rows of one run: the latest, or the latest one of ``commit``."""
    rows = _of_commit(rows, commit)
    if not rows:
        return []
    last = _runs(rows)[-1]
    return [r for r in rows if r["time_utc"] == last]


def _cell(rows, config, provider, mode, scale=1.0, digits=1):
    for r in rows:
        if r["config"] == config and r["provider"] == provider and r["mode"] == mode and r["us"]:
            return f"{float(r['us']) * scale:.{digits}f}"
    return "—"


def _source(rows) -> str:
    r = rows[0]
    return (f"{r['device']}, commit {r['commit']}, {r['time_utc'][:10]}; torch {r['torch']}"
            + (f", Triton {r['triton']}" if r.get("triton") else "") + (f", CUDA {r['cuda']}" if r.get("cuda") else ""))


def _floor(rows, config):
    for r in rows:
        if r["config"] == config and r["floor_ratio"] and r["us"]:
            return f"{float(r['us']) / float(r['floor_ratio']):.1f}"
    return "—"


def prune_table(device=GPU, commit=None) -> str:
    rows = _pick(read_rows(RESULTS, "prune", device), commit)
    if not rows:
        return "(no run)"
    configs = list(dict.fromkeys(r["config"] for r in rows))
    out = [f"`topv.prune`, bf16, 3 iterations, keep 25 %; median µs ({_source(rows)})", "",
           "| shape | floor | eager reference, graph | Triton, python | Triton, graph | CUDA C++, python | CUDA C++, graph |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for c in configs:
        out.append(f"| {c} | {_floor(rows, c)} | {_cell(rows, c, 'reference', 'graph')} | "
                   f"{_cell(rows, c, 'triton', 'python')} | {_cell(rows, c, 'triton', 'graph')} | "
                   f"{_cell(rows, c, 'cuda', 'python')} | {_cell(rows, c, 'cuda', 'graph')} |")
    curve = [r for r in rows if "@" in r["provider"]]
    if curve:
        caps = list(dict.fromkeys(r["provider"].split("@")[1] for r in curve))
        out += ["", "Large segments against the workspace cap (`max_workspace`; graph µs; the default cap is a "
                    "quarter of free device memory):", "",
                "| shape | backend | " + " | ".join(caps) + " | default |", "|---|---|" + "---:|" * (len(caps) + 1)]
        for c in dict.fromkeys(r["config"] for r in curve):
            for b in ("triton", "cuda"):
                cells = [_cell(rows, c, f"{b}@{cap}", "graph") for cap in caps] + [_cell(rows, c, b, "graph")]
                out.append(f"| {c} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def sinkhorn_table(device=GPU, commit=None) -> str:
    rows = _pick(read_rows(RESULTS, "sinkhorn", device), commit)
    if not rows:
        return "(no run)"
    configs = list(dict.fromkeys(r["config"] for r in rows))
    provs = [p for p in ("reference", "compile", "pot", "triton", "cuda") if any(r["provider"] == p for r in rows)]
    out = [f"`topv.sinkhorn` alone, 3 iterations on a stored fp32 cost; median µs, graph / python ({_source(rows)})", "",
           "| shape | " + " | ".join(provs) + " | floor |", "|---|" + "---:|" * (len(provs) + 1)]
    for c in configs:
        cells = [f"{_cell(rows, c, p, 'graph')} / {_cell(rows, c, p, 'python')}" for p in provs]
        out.append(f"| {c} | " + " | ".join(cells) + f" | {_floor(rows, c)} |")
    return "\n".join(out)


def cpu_table(commit=None) -> str:
    """One table per CPU measured (their speeds differ too much to share a table)."""
    cpus = [d for d in sorted(os.listdir(RESULTS)) if d.startswith("cpu-")]
    return "\n\n".join(_cpu_table(d, commit) for d in cpus) or "(no run)"


def _cpu_table(device, commit=None) -> str:
    rows = _pick(read_rows(RESULTS, "prune", device), commit)
    if not rows:
        return "(no run)"
    threads = json.loads(rows[0]["extra"] or "{}").get("threads", "?")
    out = [f"`topv.prune` on CPU, n = 576, keep 25 %, 3 iterations; median ms, interleaved / warm "
           f"({_source(rows)}, {threads} threads)", "",
           "| shape | eager reference | C++ `cpp` | speed-up | torch fp32 GEMM alone |", "|---|---:|---:|---:|---:|"]
    def both(c, p):
        return f"{_cell(rows, c, p, 'interleaved', 1e-3, 2)} / {_cell(rows, c, p, 'warm', 1e-3, 2)}"

    for c in dict.fromkeys(r["config"] for r in rows):
        speed = []
        for mode in ("interleaved", "warm"):
            ref, cpp = _cell(rows, c, "reference", mode), _cell(rows, c, "cpp", mode)
            speed.append("—" if "—" in (ref, cpp) else f"{float(ref) / float(cpp):.1f}×")
        out.append(f"| {c} | {both(c, 'reference')} | {both(c, 'cpp')} | {' / '.join(speed)} | "
                   f"{_cell(rows, c, 'torch bmm fp32', 'warm', 1e-3, 2)} |")
    return "\n".join(out)


def launch_table(device=None, commit=None) -> str:
    """The host cost of the Python entry points over the native launcher, per device measured."""
    out = []
    for dev in sorted(os.listdir(RESULTS)):
        rows = _pick(read_rows(RESULTS, "launch", dev), commit)
        if not rows:
            continue
        if not out:
            out = ["| device | native launcher | `topv.prune` | `torch.ops.topv.prune` | overhead of `topv.prune` |",
                   "|---|---:|---:|---:|---:|"]
        us = {r["provider"]: float(r["us"]) for r in rows}
        out.append(f"| {rows[0]['device']} ({rows[0]['commit']}) | {us['native launcher']:.1f} | {us['topv.prune']:.1f} | "
                   f"{us['torch.ops.topv.prune']:.1f} | {us['topv.prune'] - us['native launcher']:.1f} |")
    return "\n".join(["Host µs per call (B=1, n=16, d=32: the kernels take a few µs), median of many calls:", ""] + out) \
        if out else "(no run)"


def e2e_table(device=GPU, commit=None, runs=2) -> str:
    """The latest ``runs`` runs (one per commit), newest first: each run's speed-ups are against its own
    unpruned rows, since the host's speed (launch-bound decode, B=1 prefill) differs between machines."""
    rows = _of_commit(read_rows(RESULTS, "e2e", device), commit)
    commits = list(dict.fromkeys(r["commit"] for r in rows))[-runs:]
    blocks = [_e2e_run([r for r in rows if r["commit"] == c]) for c in reversed(commits)]
    return "\n\n".join(blocks) if blocks else "(no run)"


def _e2e_run(rows) -> str:
    r0 = rows[0]
    out = [f"End to end, random bf16 weights (speed and memory depend on the shapes only), attention {r0['attn']} "
           f"({r0['device']}, commit {r0['commit']}, {r0['time_utc'][:10]}; torch "
           f"{r0['torch']}, transformers {r0['transformers']}). TTFT: one prefill, eager; decode: ms per token, "
           "median (p10-p90) of single steps; step: the host / device ms of everything pruning adds to a prefill; "
           "LM graph: the language model's prefill replayed from a CUDA graph.", "",
           "| setup | B | method | keep | TTFT ms | speed-up | decode ms (p10-p90) | KV MiB | peak MiB "
           "| step host / device ms | LM graph ms |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {}
    for r in rows:
        key = (r["setup"], r["batch"])
        if r["method"] == "unpruned":
            base[key] = float(r["ttft_ms"])
    f = lambda v, p=1: "—" if v in ("", None) else f"{float(v):.{p}f}"  # noqa: E731
    for r in rows:
        key = (r["setup"], r["batch"])
        speed = f"{base[key] / float(r['ttft_ms']):.2f}×" if key in base and r["ttft_ms"] else "—"
        step = "—" if not r["step_host_ms"] else f"{f(r['step_host_ms'], 2)} / {f(r['step_device_ms'], 2)}"
        out.append(f"| {r['setup']} | {r['batch']} | {r['method']} | {f(r['keep_ratio'], 3)} | {f(r['ttft_ms'])} | {speed} | "
                   f"{f(r['decode_ms'], 2)} ({f(r['decode_p10_ms'], 1)}-{f(r['decode_p90_ms'], 1)}) | {f(r['kv_mib'], 0)} | "
                   f"{f(r['peak_mib'], 0)} | {step} | {f(r['lm_graph_ms'])} |")
    return "\n".join(out)

TABLES = {"prune-gpu": prune_table, "sinkhorn-gpu": sinkhorn_table, "prune-cpu": cpu_table, "launch": launch_table,
          "e2e-gpu": e2e_table}
_BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(\n<!-- /table -->)", re.S)


def render_readme(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the README's tables")
    ap.add_argument("--check", action="store_true", help="fail when the README's tables are not the CSVs'")
    args = ap.parse_args(argv)
    with open(README) as f:
        text = f.read()
    new = render_readme(text)
    if args.check:
        if new != text:
            sys.exit("README.md's tables differ from bench/results: run python bench/tables.py --write")
        return
    if args.write:
        with open(README, "w") as f:
            f.write(new)
        return
    for name, fn in TABLES.items():
        print(f"## {name}\n\n{fn()}\n")


if __name__ == "__main__":
    main()
