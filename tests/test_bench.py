"""The benchmark scripts' command lines: --help explains and starts nothing; results are appended
per device, never overwritten."""

import csv
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("script", ["bench_prune.py", "bench_sinkhorn.py", "bench_cpu.py", "bench_e2e.py", "bench_launch.py",
                                    "profile_triton.py", "sensitivity.py", "tables.py"])
def test_help_starts_no_run(script):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "#" not in out.stdout.splitlines()[0]


def test_rows_are_appended_per_device(tmp_path):
    from common import append_rows

    env = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "torch": "2.11", "cuda": "13.0", "triton": "3.6",
           "transformers": None, "python": "3.12"}
    p1 = append_rows(str(tmp_path), "prune", env, [{"config": "a", "us": 1.0}])
    p2 = append_rows(str(tmp_path), "prune", env, [{"config": "b", "us": 2.0}])
    assert p1 == p2 == str(tmp_path / "nvidia-h100-80gb-hbm3" / "prune.csv")
    with open(p1, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["a", "b"] and rows[0]["commit"] == "abc1234"
    with pytest.raises(SystemExit, match="has the columns"):
        append_rows(str(tmp_path), "prune", env, [{"config": "c", "ms": 3.0}])
