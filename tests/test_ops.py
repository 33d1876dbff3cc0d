"""Operator-level contracts: opcheck, fake kernels, torch.compile(fullgraph=True), CUDA graphs,
and an import of topv that works without Triton."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import backend_cases, requires_cuda

import topv


def _inputs(device, B=2, n=9, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(40)
    src = torch.randn(B, n, d, generator=g).to(device, dtype)
    tgt = torch.randn(B, n, d, generator=g).to(device, dtype)
    return src, tgt, topv.grid_positions(3, 3, device=device)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_opcheck_prune(backend, device):
    src, tgt, pos = _inputs(device)
    torch.library.opcheck(torch.ops.topv.prune.default, (src, tgt, pos, [4]), {"backend": backend})
    packed = src.reshape(-1, src.shape[-1])
    torch.library.opcheck(torch.ops.topv.prune.default, (packed, tgt.reshape(packed.shape), torch.rand(18, 2, device=device), [3, 1]),
                          {"seg_lens": [10, 8], "backend": backend, "check_finite": False})


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_opcheck_cost_matrix_and_sinkhorn(backend, device):
    src, tgt, pos = _inputs(device)
    torch.library.opcheck(torch.ops.topv.cost_matrix.default, (src, tgt[:, :5], pos, pos[:5]), {"backend": backend})
    C = torch.rand(2, 9, 5, device=device)
    torch.library.opcheck(torch.ops.topv.sinkhorn.default, (C,), {"tol": 1e-3, "n_iters": 5, "backend": backend})
    torch.library.opcheck(torch.ops.topv.sinkhorn.default, (C, torch.full((9,), 1 / 9, device=device)),
                          {"backend": backend})


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_compile_fullgraph(backend, device):
    src, tgt, pos = _inputs(device)

    def f(s, t, p):
        kept, scores = topv.prune(s * 2, t, p, 4, backend=backend, check_finite=False)
        return kept + 1, scores.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    k1, s1 = compiled(src, tgt, pos)
    k2, s2 = f(src, tgt, pos)
    assert torch.equal(k1, k2)
    torch.testing.assert_close(s1, s2)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    if backend not in topv.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} not available")
    src, tgt, pos = _inputs("cuda", B=3, n=577, d=256, dtype=torch.bfloat16)
    pos = torch.rand(577, 2, device="cuda")
    run = lambda: topv.prune(src, tgt, pos, 144, backend=backend, check_finite=False)  # noqa: E731
    eager = run()  # warm-up outside the capture builds the per-layout tables
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    src.copy_(torch.randn_like(src))  # new data, same buffers
    graph.replay()
    torch.cuda.synchronize()
    want = run()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert not torch.equal(out[0], eager[0]) or not torch.equal(out[1], eager[1])


def test_available_backends_lists_reference_everywhere():
    assert topv.available_backends("cpu")[0] == "reference"


def test_import_and_reference_without_triton():
    # A fresh interpreter in which `import triton` fails, as on a machine without Triton.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, topv
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        src = torch.randn(1, 6, 8)
        kept, scores = topv.prune(src, src + 1, topv.grid_positions(2, 3), 3, backend="reference")
        assert kept.shape == (1, 3)
        kept2, _ = topv.prune(src, src + 1, topv.grid_positions(2, 3), 3)
        assert torch.equal(kept, kept2)
        assert "triton" not in topv.available_backends("cpu")
        try:
            topv.prune(src, src + 1, topv.grid_positions(2, 3), 3, backend="triton")
        except ValueError as e:
            assert "Triton or topv.triton_kernels is not importable" in str(e), e
        else:
            raise AssertionError("backend='triton' without Triton must raise")
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture
def registry(monkeypatch):
    """Make the listed backends (and only those) available, with resolution caches cleared."""
    from topv import backends

    def only(*names):
        for name, b in backends.REGISTRY.items():
            why = None if name in names else f"{name} switched off by the test"
            monkeypatch.setitem(backends.REGISTRY, name, dataclasses.replace(b, unavailable=lambda d, w=why: w))
        backends._resolve.cache_clear()

    yield only
    backends._resolve.cache_clear()


def test_auto_follows_the_measurements(registry):
    from topv import backends

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    registry("reference", "triton", "cuda")
    assert backends.resolve_backend("auto", cuda) == "cuda"  # fastest launched from Python at every shape
    registry("reference", "triton")
    assert backends.resolve_backend("auto", cuda) == "triton"
    registry("reference", "cpp")
    assert backends.resolve_backend("auto", cpu) == "cpp"
    registry("reference")
    assert backends.resolve_backend("auto", cpu) == "reference"


def test_unavailable_backend_says_why_and_what_is_available(registry):
    from topv import backends

    registry("reference", "cpp")
    with pytest.raises(ValueError, match=r"backend='triton' is not available for tensors on cpu: triton switched off "
                                         r"by the test. Available here: \['reference', 'cpp'\]"):
        backends.resolve("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'triton', 'cuda', 'cpp'\], "
                                         r"got 'fast'"):
        backends.resolve("fast", torch.device("cpu"))


def test_typed_api_runs_the_op_kernel_directly_unless_traced(monkeypatch):
    """Eager calls skip the dispatcher's round trip; traced ones (FakeTensor here) go through it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from topv import ops

    src, tgt, pos = _inputs("cpu")
    calls = []
    real = ops.prune_eager
    monkeypatch.setattr(ops, "prune_eager", lambda *a: calls.append(a) or real(*a))
    kept, _ = topv.prune(src, tgt, pos, 4, backend="reference")
    assert len(calls) == 1 and kept.shape == (2, 4)
    assert not ops.traced(src, tgt, pos)
    with FakeTensorMode() as mode:
        fs, ft, fp = (mode.from_tensor(x) for x in (src, tgt, pos))
        assert ops.traced(fs, ft, fp)
        kept, scores = topv.prune(fs, ft, fp, 4, backend="reference", check_finite=False)
    assert kept.shape == (2, 4) and scores.shape == (2, 9)
