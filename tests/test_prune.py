"""topv.prune on every backend against the float64 oracle: odd sizes, ragged packed batches,
non-contiguous inputs, all feature dtypes, ties, tol, non-finite inputs."""

import math

import pytest
import torch
from conftest import backend_cases
from oracle import SCORE_ATOL, assert_prune_matches, assert_valid_selection, features, local_kept, oracle_prune

import topv
from topv import reference

PARAMS = topv.defaults.PRUNE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _padded_shapes(device):
    # (B, n, d, keep): the interpreter runs every program on the CPU, so CPU shapes stay small.
    if device == "cpu":
        return [(1, 1, 8, 1), (2, 7, 16, 3), (3, 19, 24, 19), (1, 33, 40, 8)]
    return [(1, 1, 64, 1), (1, 577, 256, 144), (3, 576, 1024, 100), (2, 7, 4096, 5)]


def _packed_layouts(device):
    if device == "cpu":
        return [([5, 1, 17], [2, 1, 9], 16), ([9], [4], 8)]
    return [([577, 1, 300, 64], [144, 1, 75, 64], 512), ([2880], [720], 256)]


def _run_padded(backend, device, B, n, d, keep, dtype, gen, *, contiguous=True, per_row_pos=False, **over):
    params = {**PARAMS, **over}
    src = features((B, n, d), dtype, device, gen, contiguous=contiguous)
    tgt = features((B, n, d), dtype, device, gen, contiguous=contiguous)
    pos = torch.rand((B, n, 2) if per_row_pos else (n, 2), generator=gen).to(device)
    kept, scores = topv.prune(src, tgt, pos, keep, backend=backend, **params)
    assert kept.shape == (B, keep) and scores.shape == (B, n) and kept.device.type == device
    _, oracle = oracle_prune(src, tgt, pos, [keep], None, params)
    assert_prune_matches(local_kept(kept, [n] * B, [keep] * B, True), scores, oracle, [n] * B, [keep] * B,
                         params["recover_ratio"], SCORE_ATOL[dtype])


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_matches_oracle(backend, device, dtype):
    gen = torch.Generator().manual_seed(10)
    for B, n, d, keep in _padded_shapes(device):
        _run_padded(backend, device, B, n, d, keep, dtype, gen)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_padded_noncontiguous_and_per_row_positions(backend, device):
    gen = torch.Generator().manual_seed(11)
    B, n, d, keep = _padded_shapes(device)[1]
    _run_padded(backend, device, B, n, d, keep, torch.float32, gen, contiguous=False, per_row_pos=True)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_ragged_matches_oracle(backend, device, dtype):
    gen = torch.Generator().manual_seed(12)
    for lens, keep, d in _packed_layouts(device):
        T = sum(lens)
        src, tgt = features((T, d), dtype, device, gen), features((T, d), dtype, device, gen, contiguous=False)
        pos = torch.rand(T, 2, generator=gen).to(device)
        kept, scores = topv.prune(src, tgt, pos, keep, seg_lens=lens, backend=backend, **PARAMS)
        assert kept.shape == (sum(keep),) and scores.shape == (T,)
        _, oracle = oracle_prune(src, tgt, pos, keep, lens, PARAMS)
        assert_prune_matches(local_kept(kept, lens, keep, False), scores, oracle, lens, keep, PARAMS["recover_ratio"],
                             SCORE_ATOL[dtype])


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_non_default_parameters(backend, device):
    gen = torch.Generator().manual_seed(13)
    B, n, d, keep = _padded_shapes(device)[2]
    _run_padded(backend, device, B, n, d, keep, torch.float32, gen, alpha=2.0, beta=0.5, gamma=0.0, sigma=0.5,
                eps=0.05, n_iters=5, recover_ratio=0.5)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_tol_per_segment_early_exit(backend, device):
    # Segment 0 has a uniform cost (all tokens identical): its first plan is already exact, so it
    # stops after iteration 1; segment 1 is random and runs longer.
    gen = torch.Generator().manual_seed(14)
    n, d = (12, 16) if device == "cpu" else (300, 256)
    same = torch.ones(n, d, dtype=torch.float64)
    src = torch.stack([same, torch.randn(n, d, generator=gen, dtype=torch.float64)]).float().to(device)
    tgt = torch.stack([same, torch.randn(n, d, generator=gen, dtype=torch.float64)]).float().to(device)
    pos = torch.full((2, n, 2), 0.5).to(device)
    pos[1] = torch.rand(n, 2, generator=gen)
    for tau in (PARAMS["tau"], math.inf):
        params = {**PARAMS, "n_iters": 40, "tol": 1e-3, "beta": 1.0, "tau": tau}
        kept, scores = topv.prune(src, tgt, pos, n // 3, backend=backend, **params)
        _, oracle = oracle_prune(src, tgt, pos, [n // 3], None, params)
        assert_prune_matches(list(kept.cpu()), scores, oracle, [n, n], [n // 3] * 2, params["recover_ratio"], 2e-4)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_exact_ties_go_to_the_lower_index(backend, device):
    # Identical tokens at identical positions have bit-identical cost rows, hence equal scores.
    n, d = (10, 8) if device == "cpu" else (577, 128)
    src = torch.ones(1, n, d, device=device)
    pos = torch.full((n, 2), 0.5, device=device)
    kept, scores = topv.prune(src, src.clone(), pos, 4, recover_ratio=0.0, backend=backend)
    assert kept.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(scores, scores[:, :1].expand_as(scores))


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_nonfinite_input_raises_or_stays_valid(backend, device):
    gen = torch.Generator().manual_seed(15)
    n, d = (9, 8) if device == "cpu" else (577, 64)
    for bad in (float("nan"), float("inf")):
        src = features((2, n, d), torch.float32, device, gen)
        src[1, 3, 2] = bad
        tgt, pos = features((2, n, d), torch.float32, device, gen), torch.rand(n, 2).to(device)
        with pytest.raises(ValueError, match="non-finite"):
            topv.prune(src, tgt, pos, 4, backend=backend)
        kept, _ = topv.prune(src, tgt, pos, 4, backend=backend, check_finite=False)
        for row in kept.cpu():
            assert_valid_selection(row, n, 4)
    pos = torch.rand(n, 2).to(device)
    pos[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        topv.prune(features((1, n, d), torch.float32, device, gen), features((1, n, d), torch.float32, device, gen),
                   pos, 2, backend=backend)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_keep_all_and_keep_one(backend, device):
    gen = torch.Generator().manual_seed(16)
    n = 7 if device == "cpu" else 577
    src, tgt = features((2, n, 16), torch.float32, device, gen), features((2, n, 16), torch.float32, device, gen)
    pos = topv.grid_positions(1, n, device=device)
    kept, _ = topv.prune(src, tgt, pos, n, backend=backend)
    assert torch.equal(kept.cpu(), torch.arange(n).expand(2, n))
    kept, scores = topv.prune(src, tgt, pos, 1, backend=backend)
    assert torch.equal(kept.cpu()[:, 0], scores.cpu().argmax(1))


# --------------------------------------------------------------------------------------------
# What the semi-relaxed importance guarantees (docs/algorithm.md), on every backend
# --------------------------------------------------------------------------------------------


def _grid_case(device, gen, side, d, dtype=torch.float32):
    n = side * side
    src, tgt = features((1, n, d), dtype, device, gen), features((1, n, d), dtype, device, gen)
    return src, tgt, topv.grid_positions(side, side, device=device)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_tau_inf_is_the_balanced_algorithm_where_gamma_acts_not(backend, device):
    gen = torch.Generator().manual_seed(17)
    src, tgt, pos = _grid_case(device, gen, 6 if device == "cpu" else 24, 16 if device == "cpu" else 256)
    n = pos.shape[0]
    scores = {}
    for gamma in (0.0, 0.7):
        params = {**PARAMS, "tau": math.inf, "gamma": gamma}
        kept, scores[gamma] = topv.prune(src, tgt, pos, n // 4, backend=backend, **params)
        # the balanced rule as it was written before the relaxation: score_i = n a_i exp((f_i - f'_i)/eps),
        # f' being the next (exact-marginal) f update
        eps = params["eps"]
        C = reference.cost_matrix(src.double().cpu(), tgt.double().cpu(), pos.double().cpu()[None], gamma=gamma)
        f, g = reference.sinkhorn(C, eps=eps, n_iters=params["n_iters"])
        f_next = -eps * math.log(n) - eps * torch.logsumexp((g[:, None, :] - C) / eps, 2)
        balanced = torch.exp((f - f_next) / eps)
        assert_prune_matches([kept.cpu()[0]], scores[gamma], balanced, [n], [n // 4], params["recover_ratio"], 2e-4)
    torch.testing.assert_close(scores[0.0], scores[0.7], atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_finite_tau_gamma_pulls_the_kept_set_toward_the_centre(backend, device):
    gen = torch.Generator().manual_seed(18)
    side = 8 if device == "cpu" else 24
    src, tgt, pos = _grid_case(device, gen, side, 16 if device == "cpu" else 256)
    k = pos.shape[0] // 4
    centre_dist = (pos - 0.5).norm(dim=1).cpu()
    mean_dist = []
    for gamma in (0.0, 0.1, 0.5):
        kept, _ = topv.prune(src, tgt, pos, k, gamma=gamma, recover_ratio=0.0, backend=backend)
        mean_dist.append(centre_dist[kept.cpu()[0]].mean().item())
    assert mean_dist[0] > mean_dist[1] > mean_dist[2], mean_dist


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_scores_have_a_limit_that_is_not_all_ties(backend, device):
    # Balanced OT's scores all tend to 1; the semi-relaxed ones converge to a spread with mean 1.
    gen = torch.Generator().manual_seed(19)
    src, tgt, pos = _grid_case(device, gen, 5 if device == "cpu" else 24, 16 if device == "cpu" else 256)
    n = pos.shape[0]
    _, many = topv.prune(src, tgt, pos, n // 4, n_iters=200, backend=backend)
    _, more = topv.prune(src, tgt, pos, n // 4, n_iters=400, backend=backend)
    _, balanced = topv.prune(src, tgt, pos, n // 4, n_iters=400, tau=math.inf, backend=backend)
    many, more, balanced = many.double().cpu(), more.double().cpu(), balanced.double().cpu()
    assert abs(many.mean().item() - 1.0) < 1e-4 and abs(more.mean().item() - 1.0) < 1e-4
    assert many.std().item() > 0.02, many.std()
    torch.testing.assert_close(many, more, atol=1e-4, rtol=0)  # converged: a real limit
    assert balanced.std().item() < 1e-3  # the balanced limit: all ties


def _duplicates_case(gen, n=48, d=32, hubs=3, per_hub=12, outliers=4):
    """Targets in `hubs` tight clusters of `per_hub` plus noise; among the sources, one near-copy of
    each cluster centre (a hub) and `outliers` far from every target; the rest noise."""
    cent = torch.randn(hubs, d, generator=gen, dtype=torch.float64)
    tgt = torch.randn(n, d, generator=gen, dtype=torch.float64)
    for h in range(hubs):
        spread = 0.05 * cent[h].norm() / math.sqrt(d)
        tgt[h * per_hub:(h + 1) * per_hub] = cent[h] + spread * torch.randn(per_hub, d, generator=gen, dtype=torch.float64)
    src = torch.randn(n, d, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    hub_idx, out_idx = perm[:hubs], perm[hubs:hubs + outliers]
    src[hub_idx] = cent + 0.01 * torch.randn(hubs, d, generator=gen, dtype=torch.float64)
    src[out_idx] = -10 * tgt.mean(0) + torch.randn(outliers, d, generator=gen, dtype=torch.float64)
    return src, tgt, hub_idx, out_idx


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_duplicated_sources_rank_first_outliers_last(backend, device):
    # beta = gamma = 0: only feature similarity acts. A source that is the near-duplicate of many
    # targets can serve all of them cheaply and gains mass; an outlier serves nobody.
    for seed in range(3):
        gen = torch.Generator().manual_seed(40 + seed)
        src, tgt, hubs, outliers = _duplicates_case(gen)
        n = src.shape[0]
        pos = torch.rand(n, 2, generator=gen).to(device)
        _, scores = topv.prune(src.float().to(device), tgt.float().to(device), pos, 8, beta=0.0, gamma=0.0,
                               backend=backend)
        rank = torch.argsort(torch.argsort(scores.cpu(), descending=True))
        assert rank[hubs].max().item() < len(hubs), f"hubs ranked {rank[hubs].tolist()}"
        assert rank[outliers].min().item() >= n - 2 * len(outliers), f"outliers ranked {rank[outliers].tolist()}"


@pytest.mark.parametrize("backend, device", backend_cases(include_reference=True))
def test_max_workspace_changes_only_the_memory(backend, device):
    # A cap below one segment's n² fp32 cost makes the GPU backends stream the cost in row slabs
    # (recomputed every pass); the reference and the C++ CPU kernels hold it whole either way.
    gen = torch.Generator().manual_seed(20)
    B, n, d = (2, 37, 24) if device == "cpu" else (2, 2049, 512)
    src, tgt = features((B, n, d), torch.bfloat16, device, gen), features((B, n, d), torch.bfloat16, device, gen)
    pos = torch.rand(n, 2, generator=gen).to(device)
    k1, s1 = topv.prune(src, tgt, pos, n // 4, backend=backend)
    k2, s2 = topv.prune(src, tgt, pos, n // 4, max_workspace=4 * n * 16, backend=backend)  # 16-row slabs
    torch.testing.assert_close(s2, s1, atol=2e-5, rtol=0)  # slabs change the GEMM's summation order only
    _, oracle = oracle_prune(src, tgt, pos, [n // 4], None, PARAMS)
    assert_prune_matches(list(k2.cpu()), s2, oracle, [n] * B, [n // 4] * B, PARAMS["recover_ratio"], 2e-4)
