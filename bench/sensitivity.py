"""How TopV's importance responds to its parameters, in float64 on synthetic data (the tables of
docs/algorithm.md, "Sensitivity"). A measurement of the method, not of speed: CPU, no GPU needed.

    python bench/sensitivity.py [--seeds 5] [--d 64 1024 4096]

Data: n = 576 source and target tokens on the 24 x 24 grid (LLaVA-1.5's), features i.i.d. N(0, 1)
(source and target drawn independently), budget 144 (25 %), top set only (recover_ratio = 0), so
each number is about the ranking itself. Real hidden states are not Gaussian: these tables show
how the parameters act, not which values work best on a model.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import topv
from topv import defaults as D
from topv import reference as R

N_SIDE, KEEP = 24, 144


def _case(seed: int, d: int):
    g = torch.Generator().manual_seed(seed)
    n = N_SIDE * N_SIDE
    s = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    t = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    return s, t, topv.grid_positions(N_SIDE, N_SIDE).double()[None]


def _scores(C, *, eps=D.EPS, tau=D.TAU, n_iters=D.N_ITERS):
    f, g = R.sinkhorn(C, eps=eps, n_iters=n_iters, tau_a=tau)
    return R.scores(C, f, g, eps)[0]


def _top(score, k=KEEP):
    return set(R.select(score[None], k, 0.0)[0].tolist())


def _overlap(a, b):
    return len(a & b) / len(a)


def _spearman(x, y):
    rx = torch.argsort(torch.argsort(x)).double()
    ry = torch.argsort(torch.argsort(y)).double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def _mean_range(values):
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--d", type=int, nargs="+", default=[64, 1024, 4096])
    args = ap.parse_args(argv)
    seeds = range(args.seeds)
    print(f"# n = {N_SIDE * N_SIDE} on the {N_SIDE}x{N_SIDE} grid, keep {KEEP} (top set), float64, "
          f"{args.seeds} seeds per cell; mean (min-max)")
    dist = (topv.grid_positions(N_SIDE, N_SIDE).double() - 0.5).norm(dim=1)

    print("\n## Stability: top-144 after n_iters shared with the converged (300 iterations) top-144")
    iters = (1, 3, 10, 30)
    print("| d | tau | " + " | ".join(f"{t} it." for t in iters) + " |\n|---|---|" + "---|" * len(iters))
    for d in args.d:
        for tau in (0.05, 0.1, 0.3, 1.0, math.inf):
            cells = {t: [] for t in iters}
            for seed in seeds:
                s, t, p = _case(seed, d)
                C = R.cost_matrix(s, t, p)
                ref = _top(_scores(C, tau=tau, n_iters=300))
                for it in iters:
                    cells[it].append(_overlap(_top(_scores(C, tau=tau, n_iters=it)), ref))
            print(f"| {d} | {tau} | " + " | ".join(_mean_range(cells[it]) for it in iters) + " |")

    print("\n## Score spread (std of the scores, mean 1) against iterations, d = 1024")
    iters = (1, 3, 10, 30, 100, 300)
    print("| tau | " + " | ".join(f"{t} it." for t in iters) + " |\n|---|" + "---|" * len(iters))
    for tau in (0.1, 1.0, math.inf):
        cells = {t: [] for t in iters}
        for seed in seeds:
            C = R.cost_matrix(*_case(seed, 1024))
            for it in iters:
                cells[it].append(float(_scores(C, tau=tau, n_iters=it).std()))
        print(f"| {tau} | " + " | ".join(f"{statistics.mean(cells[it]):.1e}" for it in iters) + " |")

    print("\n## gamma: the centre prior (d = 1024, 3 iterations). Top set shared with gamma = 0's, mean distance "
          f"of the top set from the centre (all tokens: {float(dist.mean()):.3f}), rank correlation of score with "
          "that distance")
    print("| tau | gamma | shared with gamma = 0 | mean centre distance | corr(score, distance) |\n|---|---|---|---|---|")
    for tau in (0.1, math.inf):
        for gamma in (0.0, 0.05, 0.1, 0.3, 1.0):
            share, mdist, corr = [], [], []
            for seed in seeds:
                s, t, p = _case(seed, 1024)
                base = _top(_scores(R.cost_matrix(s, t, p, gamma=0.0), tau=tau))
                sc = _scores(R.cost_matrix(s, t, p, gamma=gamma), tau=tau)
                top = _top(sc)
                share.append(_overlap(top, base))
                mdist.append(float(dist[list(top)].mean()))
                corr.append(_spearman(sc, dist))
            print(f"| {tau} | {gamma} | {_mean_range(share)} | {_mean_range(mdist)} | {_mean_range(corr)} |")

    print("\n## eps: score spread and float32 ties (d = 1024, 3 iterations). Ties: top-144 tokens whose float32 "
          "score equals another token's; shared: the top set shared with eps = 0.1's (same tau)")
    print("| eps | tau = 0.1: score std | ties | shared | tau = inf: score std | ties | shared |\n|---|---|---|---|---|---|---|")
    for eps in (0.02, 0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        cells = []
        for tau in (D.TAU, math.inf):
            std, ties, share = [], [], []
            for seed in seeds:
                C = R.cost_matrix(*_case(seed, 1024))
                sc = _scores(C, eps=eps, tau=tau)
                top = _top(sc)
                f32 = sc.float()
                ties.append(sum(int((f32 == f32[i]).sum()) > 1 for i in top))
                std.append(float(sc.std()))
                share.append(_overlap(top, _top(_scores(C, tau=tau))))
            cells += [f"{statistics.mean(std):.1e}", f"{statistics.mean(ties):.0f}", _mean_range(share)]
        print(f"| {eps} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
