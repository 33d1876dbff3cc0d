"""The framework-free C++ CPU library as another C++ project gets it: built with CMake (no torch,
no CUDA), installed, found with find_package(topv), linked as topv::cpu with its default runtime
(OpenMP and the built-in GEMM), and checked against the float64 reference."""

import math
import pathlib
import shutil
import struct
import subprocess

import pytest
import torch
from oracle import assert_prune_matches, features, oracle_prune

import topv

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")


@pytest.fixture(scope="module")
def consumer(tmp_path_factory):
    work = tmp_path_factory.mktemp("cpu_library")

    def run(*cmd):
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    run("cmake", "-S", ROOT, "-B", work / "build", "-DTOPV_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", work / "build", "-j", "2")
    run("cmake", "--install", work / "build", "--prefix", work / "prefix")
    run("cmake", "-S", ROOT / "csrc" / "tests" / "consumer", "-B", work / "consumer", f"-DCMAKE_PREFIX_PATH={work / 'prefix'}",
        "-DTOPV_CUDA=OFF")
    run("cmake", "--build", work / "consumer")
    return work / "consumer" / "topv_consumer_cpu"


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.parametrize("dtype", list(_DTYPE_CODE), ids=str)
@pytest.mark.parametrize("n, d", [(1, 8), (37, 33), (130, 96)])
def test_installed_cpu_library_matches_the_oracle(consumer, tmp_path, dtype, n, d):
    gen = torch.Generator().manual_seed(n + d)
    src, tgt = features((n, d), dtype, "cpu", gen), features((n, d), dtype, "cpu", gen)
    pos = torch.rand(n, 2, generator=gen)
    keep = max(1, n // 4)
    raw = lambda x: x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32).numpy().tobytes()  # noqa: E731
    (tmp_path / "in.bin").write_bytes(struct.pack("<4q", n, d, keep, _DTYPE_CODE[dtype]) + raw(src) + raw(tgt)
                                      + pos.numpy().tobytes())
    out = subprocess.run([str(consumer), tmp_path / "in.bin", tmp_path / "out.bin"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    data = (tmp_path / "out.bin").read_bytes()
    kept = torch.tensor(struct.unpack(f"<{keep}q", data[:8 * keep]))
    scores = torch.tensor(struct.unpack(f"<{n}f", data[8 * keep:]), dtype=torch.float32)
    params = topv.defaults.PRUNE
    _, oracle = oracle_prune(src, tgt, pos, [keep], [n], params)
    assert_prune_matches([kept], scores, oracle, [n], [keep], params["recover_ratio"], 2e-4)
    assert not math.isnan(scores.sum().item())
