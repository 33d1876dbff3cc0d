"""The C++ extension topv._C: its CUDA kernels (backend="cuda") and C++ CPU kernels (backend="cpp").

Each test runs on the devices whose native kernels are actually registered (skipped with the
reason otherwise) and compares against the float64 reference on fresh random inputs. The public
ops are covered for every backend in test_prune.py / test_sinkhorn.py / test_ops.py; this file
adds what is specific to the native code: the raw ``*_native`` ops, odd sizes and strides that
switch kernel variants (16-byte vs scalar loads, tile shapes, more segments than one launch
table holds), the streamed cost path of large segments, and CUDA-graph capture.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from oracle import assert_prune_matches, assert_valid_selection, features, local_kept, oracle_prune, oracle_stop

import topv
from topv import _ext, defaults, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = defaults.PRUNE
ATOL = 2e-4


def _native(key: str) -> str | None:
    """None when the native kernels for dispatch key `key` are registered, else why not."""
    if not _ext.loaded():
        return f"topv._C is not loaded ({_ext.load_error()})"
    for op in ("cost_matrix", "sinkhorn", "prune"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"topv::{op}_native", key):
            return f"topv._C has no {key} kernel for topv::{op}_native"
    return None


def _device_cases():
    out = []
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        why = "no CUDA device" if dev == "cuda" and not torch.cuda.is_available() else _native(key)
        out.append(pytest.param(dev, id=dev, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


DEVICES = _device_cases()
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
requires_cuda_native = pytest.mark.skipif(
    not torch.cuda.is_available() or _native("CUDA") is not None,
    reason="needs a CUDA device and the CUDA kernels of topv._C",
)


@pytest.fixture(params=["on-chip", "passes"])
def sinkhorn_path(request, device, monkeypatch):
    """The CUDA Sinkhorn runs on chip (one thread-block cluster per segment, sm_90+, when the segment
    fits) or as pass kernels over a cost in global memory (forced with TOPV_MAX_CLUSTER=0)."""
    if request.param == "passes":
        if device != "cuda":
            pytest.skip("one Sinkhorn path on the CPU")
        monkeypatch.setenv("TOPV_MAX_CLUSTER", "0")
    return request.param


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _prune_native(src, tgt, pos, seg_lens, keep, padded, p=PARAMS, check_finite=True):
    return torch.ops.topv.prune_native.default(
        src, tgt, pos, list(seg_lens), list(keep), padded, p["alpha"], p["beta"], p["gamma"], p["sigma"], p["eps"],
        p["tau"], p["n_iters"], p["tol"], p["recover_ratio"], check_finite, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d", [(1, 8), (7, 37), (577, 64), (128, 136), (130, 1000)])
def test_prune_native_padded_matches_oracle(device, dtype, n, d, sinkhorn_path):
    # d = 37: scalar loads; d = 64 / 1000: 16-byte loads; n = 577: partial tiles in both dims;
    # n = 128: the on-chip path reads the cost partials with 16-byte loads.
    B, keep = 2, max(1, n // 3)
    g = _gen(n * 7 + d)
    src, tgt = features((B * n, d), dtype, device, g), features((B * n, d), dtype, device, g)
    pos = torch.rand(n, 2, generator=g).to(device)
    kept, scores, bad = _prune_native(src, tgt, pos, [n] * B, [keep] * B, True)
    assert int(bad.item()) == 0
    _, oracle = oracle_prune(src.view(B, n, d), tgt.view(B, n, d), pos, [keep], None, PARAMS)
    assert_prune_matches(list(kept.view(B, keep).cpu()), scores, oracle, [n] * B, [keep] * B,
                         PARAMS["recover_ratio"], ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_native_llava_shape_matches_oracle(device, sinkhorn_path):
    # B = 1, n = 576, d = 4096: on the GPU the cost GEMM splits K to fill the SMs and a reduction
    # kernel sums the partial products before the on-chip Sinkhorn reads C.
    n, d, keep = 576, 4096, 144
    g = _gen(11)
    src, tgt = features((n, d), torch.bfloat16, device, g), features((n, d), torch.bfloat16, device, g)
    pos = topv.grid_positions(24, 24).to(device)
    kept, scores, _ = _prune_native(src, tgt, pos, [n], [keep], True)
    _, oracle = oracle_prune(src.view(1, n, d), tgt.view(1, n, d), pos, [keep], None, PARAMS)
    assert_prune_matches([kept.cpu()], scores, oracle, [n], [keep], PARAMS["recover_ratio"], ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prune_native_packed_ragged_noncontiguous(device, dtype, sinkhorn_path):
    lens, keep = [5, 1, 577, 33, 64], [2, 1, 200, 33, 7]
    T, d = sum(lens), 72
    g = _gen(1)
    src = features((T, d), dtype, device, g, contiguous=False)
    tgt = features((T, d), dtype, device, g, contiguous=False)
    pos = torch.rand(T, 2, generator=g).to(device)
    kept, scores, _ = _prune_native(src, tgt, pos, lens, keep, False)
    _, oracle = oracle_prune(src, tgt, pos, keep, lens, PARAMS)
    assert_prune_matches(local_kept(kept, lens, keep, False), scores, oracle, lens, keep, PARAMS["recover_ratio"], ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_segment_above_the_kept_scratch(dtype):
    """The C++ CPU kernels keep scratch buffers per thread up to 32 MiB each and allocate larger
    ones per call: n = 2900 needs a 33.6 MB cost and E, so both come from the per-call path."""
    if _native("CPU") is not None:
        pytest.skip(_native("CPU"))
    n, d, keep = 2900, 16, 725
    g = _gen(12)
    src, tgt = features((n, d), dtype, "cpu", g), features((n, d), dtype, "cpu", g)
    pos = torch.rand(n, 2, generator=g)
    kept, scores, _ = _prune_native(src, tgt, pos, [n], [keep], False)
    _, oracle = oracle_prune(src, tgt, pos, [keep], [n], PARAMS)
    assert_prune_matches([kept], scores, oracle, [n], [keep], PARAMS["recover_ratio"], ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_more_segments_than_one_launch_table(device, sinkhorn_path):
    # 300 segments > kMaxSegmentsPerLaunch (128): several launches per step.
    lens = [1 + (i * 7) % 23 for i in range(300)]
    keep = [max(1, n // 2) for n in lens]
    T, d = sum(lens), 16
    g = _gen(2)
    src, tgt = features((T, d), torch.float32, device, g), features((T, d), torch.float32, device, g)
    pos = torch.rand(T, 2, generator=g).to(device)
    kept, scores = topv.prune(src, tgt, pos, keep, seg_lens=lens, backend=BACKEND[device])
    _, oracle = oracle_prune(src, tgt, pos, keep, lens, PARAMS)
    assert_prune_matches(local_kept(kept, lens, keep, False), scores, oracle, lens, keep, PARAMS["recover_ratio"], ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_tol_segments_stop_at_different_iterations(device, sinkhorn_path):
    # Segment 0: near-constant cost (converges at once); 1: random; 2: strongly structured.
    n, d = 97, 32
    g = _gen(3)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    s0 = base.expand(n, d) + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    s1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    s2 = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)[:, None]
    src = torch.cat([s0, s1, s2]).float().to(device)
    tgt = torch.cat([s0.flip(0), s1 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), s2.flip(0)])
    tgt = tgt.float().to(device)
    pos = torch.rand(3 * n, 2, generator=g).to(device)
    p = dict(PARAMS, n_iters=40, tol=1e-3, eps=0.05)
    # The oracle stops these segments at different iterations (else the test would not test it).
    C = reference.cost_matrix(src.double().cpu().view(3, n, d), tgt.double().cpu().view(3, n, d),
                              pos.double().cpu().view(3, n, 2))
    stops = [oracle_stop(C[b:b + 1], p["eps"], p["tol"], p["n_iters"], tau_a=p["tau"]) for b in range(3)]
    assert len(set(stops)) > 1, stops
    kept, scores, _ = _prune_native(src, tgt, pos, [n] * 3, [20] * 3, False, p)
    _, oracle = oracle_prune(src, tgt, pos, [20] * 3, [n] * 3, p)
    assert_prune_matches(local_kept(kept, [n] * 3, [20] * 3, False), scores, oracle, [n] * 3, [20] * 3,
                         p["recover_ratio"], ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_lower_index(device):
    n, d, keep = 50, 24, 17
    row = torch.randn(1, d).expand(n, d).contiguous().to(device)
    pos = torch.full((n, 2), 0.5, device=device)
    kept, scores, _ = _prune_native(row, row, pos, [n], [keep], True)
    assert torch.equal(scores.cpu(), scores.cpu()[:1].expand(n)), "identical tokens must score identically"
    want = reference.select(torch.zeros(1, n), keep, PARAMS["recover_ratio"])[0]
    assert torch.equal(kept.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_flag_and_unchecked_selection(device):
    n, d, keep = 40, 16, 13
    g = _gen(4)
    src, tgt = torch.randn(n, d, generator=g).to(device), torch.randn(n, d, generator=g).to(device)
    pos = torch.rand(n, 2, generator=g).to(device)
    for bad_src, bad_pos in ((True, False), (False, True)):
        s, p = src.clone(), pos.clone()
        if bad_src:
            s[3, 5] = float("nan")
            s[9, 0] = float("inf")
        if bad_pos:
            p[7, 1] = float("nan")
        _, _, flag = _prune_native(s, tgt, p, [n], [keep], False, check_finite=True)
        assert int(flag.item()) != 0
        kept, _, _ = _prune_native(s, tgt, p, [n], [keep], False, check_finite=False)
        assert_valid_selection(kept.cpu(), n, keep)
        with pytest.raises(ValueError, match="non-finite"):
            topv.prune(s, tgt, p, [keep], backend=BACKEND[device])
    _, _, flag = _prune_native(src, tgt, pos, [n], [keep], False, check_finite=True)
    assert int(flag.item()) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cost_matrix_native_strided_batch(device, dtype):
    B, n, m, d = 3, 33, 19, 40
    g = _gen(5)
    s = features((B, n, d), dtype, device, g, contiguous=False)
    t = features((B, m, d), dtype, device, g)
    p = torch.rand(n, 2, generator=g).to(device).expand(B, n, 2)  # batch stride 0
    q = torch.rand(B, m, 2, generator=g).to(device)
    out = torch.ops.topv.cost_matrix_native.default(s, t, p, q, 0.7, 1.3, 0.2, 0.3)
    want = reference.cost_matrix(s.double().cpu(), t.double().cpu(), p.double().cpu(), q.double().cpu(),
                                 alpha=0.7, beta=1.3, gamma=0.2, sigma=0.3)
    torch.testing.assert_close(out.double().cpu(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("marginals", [False, True])
@pytest.mark.parametrize("tau_a, tau_b", [(math.inf, math.inf), (0.1, math.inf), (0.3, 0.05)])
def test_sinkhorn_native_matches_oracle(device, marginals, tau_a, tau_b, sinkhorn_path):
    B, n, m = 3, 45, 70
    g = _gen(6)
    C = torch.rand(B, n, m, generator=g, dtype=torch.float64) * 2
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    la, lb = (a.log().float().to(device), b.log().float().to(device)) if marginals else (None, None)
    f, gg = torch.ops.topv.sinkhorn_native.default(C.float().to(device), la, lb, 0.1, 5, 0.0, tau_a, tau_b)
    rf, rg = [], []
    for k in range(B):
        x, y = reference.sinkhorn(C[k:k + 1], a[k] if marginals else None, b[k] if marginals else None, eps=0.1,
                                  n_iters=5, tau_a=tau_a, tau_b=tau_b)
        rf.append(x)
        rg.append(y)
    torch.testing.assert_close(f.double().cpu(), torch.cat(rf), atol=2e-5, rtol=0)
    torch.testing.assert_close(gg.double().cpu(), torch.cat(rg), atol=2e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shift, eps, far", [(0.0, 0.003, False), (-8.0, 0.05, False), (0.0, 0.003, True)],
                         ids=["tiny-eps", "negative-cost", "far-column"])
def test_sinkhorn_native_extreme_costs(device, shift, eps, far, sinkhorn_path):
    """The on-chip CUDA kernel and the C++ CPU kernels take most log-sum-exps as matrix-vector
    products against a bound instead of the max, and redo a row or column exactly (max first)
    when the sum leaves the safe range. These costs take that path: a tiny eps puts some columns'
    mass 2^-64 below the bound, negative costs break the first row pass's bound (K <= 0), and a
    column far above every row's minimum has sums that underflow outright (then, once g has
    pulled that column in, so do the rows' sums). Every path must still match the oracle."""
    B, n, m = 2, 45, 70
    C = torch.rand(B, n, m, generator=_gen(6), dtype=torch.float64) * (2 if shift == 0 else 4) + shift
    if far:
        C[:, :, 5] += 1.5
    f, gg = torch.ops.topv.sinkhorn_native.default(C.float().to(device), None, None, eps, 5, 0.0, math.inf, math.inf)
    ref = [reference.sinkhorn(C[k:k + 1], eps=eps, n_iters=5) for k in range(B)]
    assert torch.isfinite(f).all() and torch.isfinite(gg).all()
    torch.testing.assert_close(f.double().cpu(), torch.cat([x for x, _ in ref]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gg.double().cpu(), torch.cat([y for _, y in ref]), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_native_ops(device):
    g = _gen(7)
    n, d = 21, 16
    src, tgt = torch.randn(2 * n, d, generator=g).to(device), torch.randn(2 * n, d, generator=g).to(device)
    pos = torch.rand(n, 2, generator=g).to(device)
    torch.library.opcheck(torch.ops.topv.prune_native.default,
                          (src, tgt, pos, [n, n], [5, 5], True, 1.0, 1.0, 0.1, 0.2, 0.1, 0.1, 3, 0.0, 0.25, True, 0))
    torch.library.opcheck(torch.ops.topv.prune_native.default,  # a padded batch as (B, n, d)
                          (src.view(2, n, d), tgt.view(2, n, d), pos, [n, n], [5, 5], True, 1.0, 1.0, 0.1, 0.2, 0.1,
                           0.1, 3, 0.0, 0.25, True, 0))
    s3, t3 = src.view(2, n, d), tgt.view(2, n, d)
    p3 = pos.expand(2, n, 2).contiguous()
    torch.library.opcheck(torch.ops.topv.cost_matrix_native.default, (s3, t3, p3, p3, 1.0, 1.0, 0.3, 0.2))
    C = torch.rand(2, n, n, generator=g).to(device)
    torch.library.opcheck(torch.ops.topv.sinkhorn_native.default, (C, None, None, 0.1, 3, 1e-3, 0.1, math.inf))


_ERROR_CASES = """
import torch, topv
x = torch.randn(10, 4)
def call(src, lens, keep):
    try:
        torch.ops.topv.prune_native.default(src, src, torch.rand(10, 2), lens, keep, False, 1.0, 1.0, 0.1, 0.2, 0.1,
                                            0.1, 3, 0.0, 0.25, True, 0)
    except RuntimeError as e:
        print("RAISED", str(e).splitlines()[0])
    else:
        print("NO ERROR")
call(x, [4, 5], [1, 1])
call(x, [5, 5], [6, 1])
call(x.double(), [10], [1])
"""


def test_argument_errors_name_what_came():
    # In a child process: on the H100 machine (torch 2.11, /opt/gcc) a TORCH_CHECK failure thrown
    # from topv._C crashed the interpreter (SIGSEGV) instead of raising; this keeps such a crash
    # from taking the whole test session down and reports it as a failure.
    import subprocess
    import sys

    if _native("CPU") is not None:
        pytest.skip(_native("CPU"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _ERROR_CASES], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, f"child exited with {proc.returncode} (a C++ exception crashed it?): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("RAISED") for line in lines), proc.stdout
    assert "seg_lens sum to 9" in lines[0]
    assert "keep 6" in lines[1]
    assert "float32, float16 or bfloat16" in lines[2]


# --------------------------------------------------------------------------------------------- CUDA only


@requires_cuda_native
def test_streamed_cost_path_matches_oracle(monkeypatch):
    # A tiny cost-buffer cap forces the large-segment path (row chunks recomputed every pass):
    # 256 + 256 + 188 rows, with the tolerance check across chunks, and in a padded batch with
    # shared positions (chunk rows index the shared table from the chunk start).
    n, d = 700, 64
    g = _gen(8)
    src = features((2 * n, d), torch.bfloat16, "cuda", g)
    tgt = features((2 * n, d), torch.bfloat16, "cuda", g)
    shared = torch.rand(n, 2, generator=g).cuda()
    packed = torch.rand(2 * n, 2, generator=g).cuda()
    monkeypatch.setenv("TOPV_COST_BUFFER_CAP_BYTES", str(300 * n * 4))
    for tol, padded in ((0.0, True), (1e-3, False)):
        p = dict(PARAMS, tol=tol, n_iters=30 if tol else 3)
        pos = shared if padded else packed
        kept, scores, _ = _prune_native(src, tgt, pos, [n, n], [100, 100], padded, p)
        if padded:
            _, oracle = oracle_prune(src.view(2, n, d), tgt.view(2, n, d), pos, [100], None, p)
        else:
            _, oracle = oracle_prune(src, tgt, pos, [100, 100], [n, n], p)
        got = list(kept.view(2, 100).cpu()) if padded else local_kept(kept, [n, n], [100, 100], False)
        assert_prune_matches(got, scores, oracle, [n, n], [100, 100], p["recover_ratio"], ATOL)


@requires_cuda_native
@pytest.mark.parametrize("padded", [True, False])
def test_cuda_graph_capture_and_replay(padded):
    g = _gen(9)
    n, d = 64, 128
    lens = [n, n, n] if padded else [40, 64, 25]
    T = sum(lens)
    src = features((T, d), torch.bfloat16, "cuda", g)
    tgt = features((T, d), torch.bfloat16, "cuda", g)
    if padded:
        src, tgt = src.view(3, n, d), tgt.view(3, n, d)
        pos, keep, kw = torch.rand(n, 2, generator=g).cuda(), [16], {}
    else:
        pos, keep, kw = torch.rand(T, 2, generator=g).cuda(), [10, 16, 5], {"seg_lens": lens}
    run = lambda: topv.prune(src, tgt, pos, keep, backend="cuda", check_finite=False, **kw)  # noqa: E731
    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()  # same input values: the replay reproduces the eager result
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0])
    assert torch.equal(out[1], eager[1])
    # New values in the captured input buffers flow through the replay.
    src.copy_(features(tuple(src.shape), torch.bfloat16, "cuda", g))
    graph.replay()
    fresh = run()
    torch.cuda.synchronize()
    assert torch.equal(out[0], fresh[0])
    assert torch.equal(out[1], fresh[1])


@requires_cuda_native
def test_cuda_matches_cpp_on_same_input():
    if _native("CPU") is not None:
        pytest.skip(_native("CPU"))
    g = _gen(10)
    n, d = 576, 256
    src, tgt = features((2, n, d), torch.bfloat16, "cpu", g), features((2, n, d), torch.bfloat16, "cpu", g)
    pos = topv.grid_positions(24, 24)
    kc, sc = topv.prune(src, tgt, pos, [144], backend="cpp")
    kg, sg = topv.prune(src.cuda(), tgt.cuda(), pos.cuda(), [144], backend="cuda")
    torch.testing.assert_close(sg.cpu(), sc, atol=ATOL, rtol=0)
    _, oracle = oracle_prune(src, tgt, pos, [144], None, PARAMS)
    assert_prune_matches(list(kg.cpu()), sg, oracle, [n, n], [144, 144], PARAMS["recover_ratio"], ATOL)
    assert math.isfinite(float(sg.sum()))


_BF16_CASE = """
import torch, topv
from oracle import assert_prune_matches, features, oracle_prune
g = torch.Generator().manual_seed(12)
for B, n, d in ((1, 61, 131), (3, 200, 256)):
    src, tgt = features((B, n, d), torch.bfloat16, "cpu", g), features((B, n, d), torch.bfloat16, "cpu", g)
    pos = torch.rand(n, 2, generator=g)
    kept, scores = topv.prune(src, tgt, pos, n // 3, backend="cpp")
    _, oracle = oracle_prune(src, tgt, pos, [n // 3], None, topv.defaults.PRUNE)
    assert_prune_matches(list(kept), scores, oracle, [n] * B, [n // 3] * B, 0.25, 2e-4)
print("ok")
"""


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cpu"])
@pytest.mark.parametrize("force", ["1", "0"])
def test_cpu_bf16_gemm_both_ways(device, force):
    """The C++ CPU kernels' own AVX512-BF16 GEMM (forced on where the CPU has the instructions: by
    default CPUs with AMX skip it) and the fp32 path give the oracle's result on bf16 features."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if force == "1" and "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512-BF16")
    import subprocess
    import sys

    env = {**os.environ, "TOPV_CPU_BF16_GEMM": force, "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", _BF16_CASE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
