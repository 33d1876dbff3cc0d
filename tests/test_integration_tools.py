"""The demo and the end-to-end benchmark, as a new user runs them (CPU, tiny models)."""

import csv
import os
import pathlib
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

from topv import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.parametrize("argv,match", [
    (["--keep-ratio", "0"], r"--keep-ratio must lie in \(0, 1\], got 0.0"),
    (["--keep-ratio", "1.5"], "--keep-ratio must lie"),
    (["--layer", "7"], r"--layer must lie in \[0, 6\] for the demo's 8-layer model, got 7"),
    (["--method", "fastv", "--layer", "0"], r"--layer must lie in \[1, 6\]"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--backend", "bogus"], "--backend: backend must be one of .* got 'bogus'"),
    (["--backend", "cuda", "--device", "cpu"], "--backend: backend='cuda' is not available"),
    (["--method", "dart", "--backend", "reference"], "--backend configures method topv"),
    (["--out", "/nonexistent-folder/x.png"], "--out: the folder /nonexistent-folder does not exist"),
    (["--method", "bogus"], "invalid choice: 'bogus'"),
    (["--stage", "vision", "--method", "fastv"], "--method fastv reads the language model's attention"),
    (["--stage", "vision", "--layer", "1"], "--layer configures --stage layer"),
    (["--stage", "vision", "--kv", "all"], "--kv configures --stage layer"),
])
def test_demo_checks_arguments_before_building_anything(argv, match, capsys, monkeypatch):
    monkeypatch.setattr("topv.testing.tiny_models.build", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(SystemExit):
        demo.main(argv)
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_demo_runs_with_nothing_pruned(tmp_path, capsys, monkeypatch):
    """keep_ratio 1.0 prunes nothing and says so; the demo's own calls raise no deprecation notice."""
    from transformers.utils import generic

    notices = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: notices.append(msg))
    out = tmp_path / "all.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert demo.main(["--keep-ratio", "1.0", "--new-tokens", "2", "--out", str(out)]) == 0
    assert "kept 576/576 (nothing pruned" in capsys.readouterr().out
    assert not [n for n in notices if "deprecated" in n], notices
    assert out.exists()


def test_demo_vision_stage(tmp_path, capsys):
    assert demo.main(["--stage", "vision", "--new-tokens", "2", "--out", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "stage=vision: image tokens kept 144/576" in out
    assert "every layer (0..7): 196 of 628 (pruned before the language model" in out
    assert "KV-cache length per layer after prefill: [196, 196, 196, 196, 196, 196, 196, 196]" in out


@pytest.mark.parametrize("matplotlib", [True, False])
def test_demo_picture_explains_itself(tmp_path, monkeypatch, matplotlib):
    """Top and recovery tokens are framed in different colours, pruned ones dimmed, with a title
    and a legend, with or without matplotlib."""
    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "kept.png"
    assert demo.main(["--new-tokens", "1", "--out", str(out)]) == 0
    w, h = _png_size(out)
    if not matplotlib:
        assert (w, h) == (2 * 336, 2 * 336 + 2 * 36)  # the picture plus title and legend bands
    image = demo._synthetic_image(28)
    rgb = demo.marked_image(image, torch.tensor([0]), torch.tensor([1]), 2)
    assert torch.equal(rgb[0, 0], torch.tensor(demo.TOP)) and torch.equal(rgb[0, 14], torch.tensor(demo.RECOVERY))
    assert bool((rgb[14:, :] < image.permute(1, 2, 0)[14:, :]).all())  # pruned: dimmed
    canvas = demo._with_text(torch.ones(10, 300, 3), "TOPV 25%", [("top score", demo.TOP)])
    assert bool((canvas[:36] == 0).any()) and bool((canvas[-36:] == 0).any())  # title and legend text drawn


def test_bench_quick_runs_every_method_on_cpu(tmp_path):
    """bench/bench_e2e.py --quick: every method and both stages, every tiny setup, in well under a
    minute; rows appended to <--out>/<device>/e2e.csv (and nothing written without --out); keep
    ratios are selectable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--quick", "--device", "cpu", "--out", str(tmp_path)]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    took = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout + run.stderr
    assert took < 60, took
    out, = tmp_path.glob("*/e2e.csv")  # bench/results/<device>/e2e.csv, as every benchmark
    rows = list(csv.DictReader(open(out)))
    methods = ["unpruned", "topv/after_k", "topv/all", "topv/vision", "fastv", "random", "uniform", "dart"]
    assert [r["method"] for r in rows] == methods * 4  # llava B=1, B=2, llava-next, qwen video
    for r in rows:
        assert float(r["ttft_ms"]) > 0 and float(r["decode_ms"]) > 0 and r["commit"] and r["sdpa_decode"]
        assert float(r["decode_p10_ms"]) <= float(r["decode_ms"]) <= float(r["decode_p90_ms"])
        if r["method"] != "unpruned":
            assert r["syncs"] == "0" and float(r["step_host_ms"]) > 0 and r["keep_ratio"] == "0.25"
            assert int(r["tokens_after_k"]) < int(r["prompt_tokens"])
    for i in range(0, len(rows), len(methods)):  # the vision stage caches what topv/all caches
        by = {r["method"]: r for r in rows[i:i + len(methods)]}
        assert by["topv/vision"]["kv_mib"] == by["topv/all"]["kv_mib"] != by["topv/after_k"]["kv_mib"]
    assert "FAILED" not in run.stdout and "profiler_start" not in run.stderr
    assert "method |" in run.stdout and "round 2/2 done" in run.stdout
    quiet = subprocess.run(cmd[:-2] + ["--setups", "llava-tiny", "--batches", "1", "--methods", "unpruned"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and "appended" not in quiet.stdout
    assert len(list(csv.DictReader(open(out)))) == len(rows)
    ratios = subprocess.run(cmd + ["--setups", "llava-tiny", "--batches", "1", "--methods",
                                   "unpruned,topv/vision,dart/all", "--keep", "0.5,0.125", "--rounds", "1",
                                   "--decode-steps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert ratios.returncode == 0, ratios.stdout + ratios.stderr
    new = list(csv.DictReader(open(out)))[len(rows):]
    assert [(r["method"], r["keep_ratio"]) for r in new] == [
        ("unpruned", ""), ("topv/vision", "0.5"), ("dart/all", "0.5"), ("topv/vision", "0.125"), ("dart/all", "0.125")]
    assert int(new[1]["tokens_after_k"]) > int(new[3]["tokens_after_k"])


@pytest.mark.parametrize("argv,match", [
    (["--methods", "fastv/vision"], "unknown method 'fastv/vision'.*fastv has no vision stage"),
    (["--methods", "topv/layer"], r"unknown method 'topv/layer'.*<variant> in \['after_k', 'all', 'vision'\]"),
    (["--keep", "0.5,x"], "--keep must be comma-separated numbers"),
    (["--keep", "0.5,0"], r"--keep ratios must lie in \(0, 1\], got 0.5,0"),
])
def test_bench_checks_arguments(argv, match):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--quick", "--device", "cpu", *argv],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert run.returncode == 2 and re.search(match, run.stderr), run.stderr


def test_bench_checks_out_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_e2e.py"), "--quick", "--device", "cpu", "--out",
           str(blocker / "sub")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert run.returncode != 0 and "--out: cannot create the folder" in run.stderr and "built" not in run.stdout
